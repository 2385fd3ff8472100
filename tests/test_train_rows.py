"""Train only chosen rows (issue 17): after a few AdamW steps with weight decay, exactly the chosen rows of the token
tables, the output layer (tied or not) and its bias moved; every other row is bitwise as it was; the pad row is zero; on
fastai's AWD-LSTM after load_pretrained with a new vocab, GPT-2 (tied) and a Llama-style model (untied) after
resize_token_embeddings; with freeze() and after unfreeze(); through export/load_learner; and the cost is the rows'."""
import os, warnings
import torch, pytest
import torch.nn.functional as F
from fastai.text.all import *
from fastai_padguard.all import *
from fastai_padguard.data import *
from fastai_padguard.train_rows import RowTrainer
from conftest import ids_dls, HFLogits, quiet, rel_err

def effective(learn):
    "Each frozen parameter as the model uses it: its rows with the chosen ones put in place, by parameter names"
    rt = learn.cbs.filter(lambda c: isinstance(c, RowTrainer))
    if not rt: return {n: p.detach().clone() for n,p in learn.model.named_parameters() if 'trained_rows' not in n}
    tr = rt[0].trained
    res = {n: p.detach().clone() for n,p in learn.model.named_parameters() if 'trained_rows' not in n}
    names = {id(p): n for n,p in learn.model.named_parameters(remove_duplicate=False)}
    for rp in tr.params:
        for n,q in learn.model.named_parameters(remove_duplicate=False):
            if q is rp.param and n in res: res[n][list(tr.rows)] = rp.values.detach()
    return res

def check_only_rows_moved(before, after, rows, frozen, pad_rows=()):
    "`frozen`: names of the tables/heads/biases: only `rows` of them moved, each of them did; the guarded `pad_rows` are zero"
    for n in frozen:
        b, a = before[n], after[n]
        others = [i for i in range(b.shape[0]) if i not in rows and i not in pad_rows]
        assert torch.equal(a[others], b[others]), f"{n}: a row that was not chosen moved"
        for r in rows: assert not torch.equal(a[r], b[r]), f"{n}: chosen row {r} did not train"
        for r in pad_rows: assert (a[r] == 0).all(), f"{n}: pad row {r} is not zero"

def pretrained_awd(tmp_path, drop=('W', 'Y')):
    "A fastai LM on data whose tokens `drop` the pretrained vocab lacked, loaded with load_pretrained: (learn, new rows)"
    set_seed(0, reproducible=True)
    dls = protein_lm_dls(n=300, bs=16, seq_len=16)
    base = language_model_learner(dls, AWD_LSTM, config=small_lm_config(), pretrained=False)
    torch.save(base.model.state_dict(), tmp_path/'lm.pth')
    save_pickle(tmp_path/'vocab.pkl', [t for t in dls.vocab if t not in drop])
    learn = quiet(language_model_learner(dls, AWD_LSTM, config=small_lm_config(), pretrained=False, wd=0.1))
    learn.load_pretrained(tmp_path/'lm.pth', tmp_path/'vocab.pkl')
    rows = new_rows(dls.vocab, tmp_path/'vocab.pkl')
    assert sorted(dls.vocab[i] for i in rows) == sorted(drop)
    return learn, rows

AWD_FROZEN = ['0.encoder.weight', '1.decoder.bias']

def test_awd_after_load_pretrained_only_new_rows_move(tmp_path):
    "load_pretrained gave the new tokens the mean row; after 2 epochs with AdamW wd=0.1 only they moved (table, tied decoder, bias)"
    learn, rows = pretrained_awd(tmp_path)
    learn.unfreeze()
    learn.train_rows(rows)
    before = effective(learn)
    lstm0 = learn.model[0].rnns[0].weight_hh_l0_raw.detach().clone()
    learn.fit(2, 1e-2)
    after = effective(learn)
    check_only_rows_moved(before, after, rows, AWD_FROZEN, pad_rows=[1, 29, 30, 31])
    assert not torch.equal(learn.model[0].rnns[0].weight_hh_l0_raw, lstm0), "the rest of the model trains (unfrozen)"
    assert learn.model[1].decoder.weight is learn.model[0].encoder.weight

def test_freeze_then_unfreeze(tmp_path):
    "With freeze() (load_pretrained's default) the LSTM stays still and the rows train; after unfreeze() the tables stay frozen"
    learn, rows = pretrained_awd(tmp_path)
    learn.train_rows(rows)  # load_pretrained froze all but the last group
    before = effective(learn)
    lstm0 = learn.model[0].rnns[0].weight_hh_l0_raw.detach().clone()
    learn.fit(1, 1e-2)
    mid = effective(learn)
    check_only_rows_moved(before, mid, rows, AWD_FROZEN, pad_rows=[1, 29, 30, 31])
    assert torch.equal(learn.model[0].rnns[0].weight_hh_l0_raw, lstm0), "freeze() kept the LSTM still"
    learn.unfreeze()  # sets requires_grad on the whole group of the tables: the rows' trainer freezes them again at fit
    learn.fit(1, 1e-2)
    check_only_rows_moved(mid, effective(learn), rows, AWD_FROZEN, pad_rows=[1, 29, 30, 31])

def test_lift_returns_to_normal_training(tmp_path):
    learn, rows = pretrained_awd(tmp_path)
    learn.train_rows(rows); learn.fit(1, 1e-2)
    trained = effective(learn)
    learn.train_rows(None)
    assert not learn.cbs.filter(lambda c: isinstance(c, RowTrainer))
    assert not [n for n,_ in learn.model.named_parameters() if 'trained_rows' in n]
    w = learn.model[0].encoder.weight
    assert torch.equal(w, trained['0.encoder.weight']) and w.requires_grad
    learn.unfreeze(); learn.fit(1, 1e-2)
    others = [i for i in range(w.shape[0]) if i not in rows + [1, 29, 30, 31]]
    assert not torch.equal(w[others], trained['0.encoder.weight'][others]), "every row trains again"

def test_export_load_learner_and_lift_after(tmp_path):
    learn, rows = pretrained_awd(tmp_path)
    learn.train_rows(rows); learn.fit(1, 1e-2)
    trained = effective(learn)
    learn.export(tmp_path/'m.pkl')
    l2 = load_learner(tmp_path/'m.pkl')
    l2.predict('ACD', n_words=2)
    for n in AWD_FROZEN: assert torch.equal(effective(l2)[n], trained[n])
    l2.train_rows(None)
    assert torch.equal(l2.model[0].encoder.weight, trained['0.encoder.weight'])

def test_cost_is_the_rows():
    "The optimizer holds state for the chosen rows only, never a vocab x dim tensor; the tables have no gradient"
    set_seed(0, reproducible=True)
    dls = protein_lm_dls(n=300, bs=16, seq_len=16)
    learn = quiet(language_model_learner(dls, AWD_LSTM, config=small_lm_config(), pretrained=False, wd=0.1))
    learn.train_rows([5, 6, 7]); learn.fit(1, 1e-2)
    V = len(dls.vocab)
    shapes = [tuple(v.shape) for st in learn.opt.state.values() for v in st.values() if isinstance(v, Tensor)]
    assert shapes and all(s[0] != V for s in shapes), shapes
    assert learn.model[0].encoder.weight.grad is None and learn.model[1].decoder.bias.grad is None

def test_frozen_rows_stay_in_the_softmax():
    "The loss over chosen and frozen rows alike: plain cross-entropy over every column but the pad's and the xxfake ones"
    set_seed(0, reproducible=True)
    dls = protein_lm_dls(n=300, bs=16, seq_len=16)
    learn = quiet(language_model_learner(dls, AWD_LSTM, config=small_lm_config(), pretrained=False))
    learn.model.double(); learn.model.reset()
    learn.train_rows([5, 6])
    xb, yb = dls.one_batch()
    learn.model.eval()
    with torch.no_grad():
        out = learn.model(xb)[0].double()
        loss = learn.loss_func(out, yb)
    keep = [c for c in range(out.shape[-1]) if c not in (1, 29, 30, 31)]
    remap = torch.full((out.shape[-1],), -100); remap[keep] = torch.arange(len(keep))
    t = yb.reshape(-1); t = torch.where(torch.isin(t, torch.tensor([1, 29, 30, 31])), -100, remap[t])
    ref = F.cross_entropy(out.reshape(-1, out.shape[-1])[:, keep], t)
    assert rel_err(loss, ref) <= 1e-10

def hf_resized(kind, added=3):
    "An HF LM built from a small config (no download), grown by `added` rows with resize_token_embeddings: (model, n, pad, new rows)"
    T = pytest.importorskip('transformers')
    torch.manual_seed(0)
    if kind == 'gpt2':
        m = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=1, n_head=2, tie_word_embeddings=True))
    else:
        m = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=False))
    m.resize_token_embeddings(50 + added + 1)  # the new tokens and a pad
    m.config.pad_token_id = 50 + added
    return m, 50 + added + 1, 50 + added, list(range(50, 50 + added))

@pytest.mark.parametrize('kind', ['gpt2', 'llama'])
def test_hf_after_resize(kind):
    "GPT-2 (tied) and a Llama-style model (untied head) after resize_token_embeddings: only the added rows move"
    m, n, pad, rows = hf_resized(kind)
    set_seed(0, reproducible=True)
    learn = quiet(Learner(ids_dls(n, pad, lo=3), m, loss_func=CrossEntropyLossFlat(), cbs=HFLogits(), wd=0.1)).padguard()
    learn.train_rows(rows)
    frozen = ['transformer.wte.weight'] if kind == 'gpt2' else ['model.embed_tokens.weight', 'lm_head.weight']
    before = effective(learn)
    learn.fit(2, 1e-2)
    check_only_rows_moved(before, effective(learn), rows, frozen, pad_rows=[pad])

def test_added_rows_of_a_tokenizer():
    T = pytest.importorskip('transformers'); tk = pytest.importorskip('tokenizers')
    vocab = {t: i for i, t in enumerate(['[UNK]', '[PAD]', 'a', 'b', 'c'])}
    tok = T.PreTrainedTokenizerFast(tokenizer_object=tk.Tokenizer(tk.models.WordLevel(vocab, unk_token='[UNK]')), unk_token='[UNK]', pad_token='[PAD]')
    tok.add_tokens(['newword', 'other'])
    assert added_rows(tok) == [5, 6]

def test_misuse(tmp_path, lm):
    learn = lm().padguard()
    with pytest.raises(ValueError, match=r'Rows \[1\] are guarded'): learn.train_rows([1, 5])
    with pytest.raises(ValueError, match='rows='): learn.train_rows([])
    with pytest.raises(ValueError, match='out of range'): learn.train_rows([40])
    assert not learn.cbs.filter(lambda c: isinstance(c, RowTrainer)) and not [n for n,_ in learn.model.named_parameters() if 'trained' in n]
    learn.train_rows([5])
    with pytest.raises(ValueError, match='already trains rows'): learn.train_rows([6])

def test_after_a_normal_fit(tmp_path):
    "Gradients and AdamW state left by an earlier fit of the whole table can't move its frozen rows (no gradient: no step)"
    learn, rows = pretrained_awd(tmp_path)
    learn.unfreeze(); learn.fit(1, 1e-2)
    learn.train_rows(rows)
    before = effective(learn)
    learn.fit(1, 1e-2)
    check_only_rows_moved(before, effective(learn), rows, AWD_FROZEN, pad_rows=[1, 29, 30, 31])

@pytest.mark.parametrize('kind', ['awd', 'gpt2'])
def test_lookups_and_logits_use_the_trained_rows(kind, lm):
    "The model reads the rows' parameter, not the table's stale rows: in its lookups (EmbeddingDropout, nn.Embedding) and its logits"
    if kind == 'awd':
        learn = lm(); learn.train_rows([5, 6]); emb, head = learn.model[0].encoder_dp, learn.model[1].decoder
    else:
        m, n, pad, rows = hf_resized('gpt2')
        learn = quiet(Learner(ids_dls(n, pad, lo=3), m, loss_func=CrossEntropyLossFlat(), cbs=HFLogits())).padguard()
        learn.train_rows([5, 6]); emb, head = m.transformer.wte, m.lm_head
    rt = learn.cbs.filter(lambda c: isinstance(c, RowTrainer))[0]
    v = rt.trained.params[0].values
    with torch.no_grad(): v.add_(1.)  # the rows now differ from the table's
    learn.model.eval()
    with torch.no_grad():
        out = emb(torch.tensor([[5, 6, 7]]))
        assert torch.equal(out[0, :2], v) and torch.equal(out[0, 2], rt.trained.params[0].param[7])
        h = torch.randn(3, v.shape[1])
        logits = head(h)
        assert torch.allclose(logits[:, [5, 6]], F.linear(h, v, None if head.bias is None else rt.trained.params[-1].values), atol=1e-6)

@pytest.mark.parametrize('opt', ['Lamb', 'ranger', 'SGD-mom', 'RAdam'])
def test_every_optimizer_accumulation_checkpoints(tmp_path, opt):
    "Lamb, ranger, SGD with momentum, RAdam; GradientAccumulation; SaveModelCallback: only the chosen rows move"
    learn, rows = pretrained_awd(tmp_path)
    learn.opt_func = {'Lamb': Lamb, 'ranger': ranger, 'SGD-mom': partial(SGD, mom=0.9), 'RAdam': RAdam}[opt]
    learn.path = tmp_path
    learn.unfreeze(); learn.train_rows(rows)
    before = effective(learn)
    learn.fit_one_cycle(2, 1e-2, wd=0.1, cbs=[GradientAccumulation(32), SaveModelCallback(fname='best')])
    check_only_rows_moved(before, effective(learn), rows, AWD_FROZEN, pad_rows=[1, 29, 30, 31])

def test_embedding_dropout_drops_the_chosen_rows_too(lm):
    "In training, fastai's EmbeddingDropout masks whole rows: a chosen row it drops is dropped, as a table row would be"
    learn = lm(); learn.train_rows([5, 6])
    ed = learn.model[0].encoder_dp; ed.embed_p = 1 - 1e-9  # every row dropped
    ed.train(); torch.manual_seed(0)
    assert (ed(torch.tensor([[5, 6, 7]])) == 0).all()

def test_guard_and_train_rows_compose_in_either_order(lm):
    "A row both guarded and trained is an error whichever comes first, and the refused call changes nothing"
    learn = lm().padguard()
    learn.train_rows([20, 21])
    guard, lf, cbs = learn.pad_guard, learn.loss_func, list(learn.cbs)
    with pytest.raises(ValueError, match=r'Rows \[20\] train \(learn.train_rows\)'): learn.padguard(extra_idxs=[20])
    assert list(learn.cbs) == cbs and learn.pad_guard is guard and learn.loss_func is lf
    learn.train_rows(None)
    learn.padguard(extra_idxs=[20])
    guard, lf, cbs = learn.pad_guard, learn.loss_func, list(learn.cbs)
    with pytest.raises(ValueError, match=r'Rows \[20\] are guarded'): learn.train_rows([20, 21])
    assert list(learn.cbs) == cbs and learn.pad_guard is guard and learn.loss_func is lf
    assert not [n for n,_ in learn.model.named_parameters() if 'trained_rows' in n]

@pytest.mark.parametrize('rows', [[1, 5], [40]], ids=['guarded', 'out-of-range'])
def test_a_refused_train_rows_leaves_the_learner_as_it_was(lm, rows):
    "On a learner without a guard: no PadGuard added, the loss not swapped, no parameter registered"
    learn = lm()
    cbs, lf, names = list(learn.cbs), learn.loss_func, [n for n,_ in learn.model.named_parameters()]
    with pytest.raises(ValueError): learn.train_rows(rows)
    assert list(learn.cbs) == cbs and learn.loss_func is lf and not hasattr(learn, 'pad_guard')
    assert [n for n,_ in learn.model.named_parameters()] == names

def test_the_bias_rows_keep_fastais_no_weight_decay(lm):
    "fastai doesn't decay biases (wd_bn_bias=False): the bias's trained rows don't decay either; the table's rows do"
    learn = lm(wd=0.5).padguard()
    learn.train_rows([20, 21])
    learn.fit(1, 1e-2)
    tr = learn.cbs.filter(lambda c: isinstance(c, RowTrainer))[0].trained
    bias, table = tr.of(learn.model[1].decoder.bias).values, tr.of(learn.model[0].encoder.weight).values
    assert learn.opt.state[bias]['do_wd'] is False and learn.opt.state[table].get('do_wd', True) is True

def test_a_checkpoint_taken_while_rows_train_loads_into_plain_fastai(lm, tmp_path):
    "learn.save while rows train: a plain learner (no guard, no train_rows) loads it strictly, with the trained rows in its tables"
    learn = lm(wd=0.1, path=tmp_path).padguard()
    learn.train_rows([20, 21])
    learn.fit(1, 1e-2)
    used = effective(learn)
    sd = learn.model.state_dict()
    assert not [k for k in sd if 'trained_rows' in k]
    assert torch.equal(sd['0.encoder.weight'], used['0.encoder.weight']) and torch.equal(sd['1.decoder.bias'], used['1.decoder.bias'])
    learn.save('mid')
    plain = lm(path=tmp_path)
    plain.load('mid', with_opt=False)
    for n in ('0.encoder.weight', '1.decoder.bias'): assert torch.equal(dict(plain.model.named_parameters())[n], used[n]), n
    learn.fit(1, 1e-2)  # training on, then back to the checkpoint: the rows' own parameter is loaded from the tables
    learn.load('mid')
    assert torch.equal(effective(learn)['0.encoder.weight'], used['0.encoder.weight'])

def test_save_pretrained_while_rows_train_holds_them(tmp_path):
    "A Hugging Face model saved while its added rows train: from_pretrained, without this package, has the trained rows"
    T = pytest.importorskip('transformers')
    m, n, pad, rows = hf_resized('llama')
    set_seed(0, reproducible=True)
    learn = quiet(Learner(ids_dls(n, pad, lo=3), m, loss_func=CrossEntropyLossFlat(), cbs=HFLogits(), wd=0.1)).padguard()
    learn.train_rows(rows)
    learn.fit(1, 1e-2)
    used = effective(learn)
    m.save_pretrained(tmp_path/'hf')
    m2 = T.LlamaForCausalLM.from_pretrained(tmp_path/'hf')
    for k in ('model.embed_tokens.weight', 'lm_head.weight'):
        assert torch.equal(dict(m2.named_parameters())[k], used[k]), k
        assert not torch.equal(used[k][rows], learn.model.get_parameter(k)[rows]), "control: the table itself holds the untrained rows"

@pytest.mark.parametrize('scale', [None, 0.5])
def test_embedding_dropout_is_fastais_own_with_the_rows_in_the_table(lm, scale):
    "With row dropout on, the lookup equals, bitwise, fastai's EmbeddingDropout on a table holding the trained rows (same RNG)"
    from fastai.text.models.awdlstm import EmbeddingDropout
    learn = lm(); learn.train_rows([5, 6])
    ed = learn.model[0].encoder_dp; ed.embed_p = 0.5; ed.train()
    rt = learn.cbs.filter(lambda c: isinstance(c, RowTrainer))[0]
    with torch.no_grad(): rt.trained.of(ed.emb.weight).values.mul_(3)   # the rows have trained away from the table's copy
    ref = EmbeddingDropout(nn.Embedding(32, 32, padding_idx=1), 0.5); ref.train()
    with torch.no_grad(): ref.emb.weight.copy_(learn.model.state_dict()['0.encoder.weight'])
    ids = torch.tensor([[5, 6, 7, 1, 5, 20, 6]])
    for seed in range(4):
        torch.manual_seed(seed); a = ed(ids, scale)
        torch.manual_seed(seed); b = ref(ids, scale)
        assert torch.equal(a, b), seed
