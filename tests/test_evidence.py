"""Exactly the rows you mean, by evidence (issue 15): which tables the batch's token ids index and which layer writes the
logits the loss scores are read from one batch run through the model, whatever the names; resolving leaves the model,
its hidden state and every RNG bitwise as they were."""
import random
import numpy as np, torch, pytest
from fastai.text.all import *
from fastai_padguard.all import *
from fastai_padguard.data import *
from fastai_padguard.rows import find_guarded
from fastai_padguard.core import learner_batch, learner_scored
from conftest import quiet, ids_dls, params_of, guarded_rows_of, HFLogits, NanoGPT

def check_trained(learn, before, guarded:dict, mode='zero', moved:dict=None):
    "`guarded` `{param name: rows}`: those rows zero (or frozen) bitwise, the other rows trained; `moved` `{param name: rows}`: trained"
    ps = dict(learn.model.named_parameters())
    for names,rows in guarded.items():
        n = names.split(' = ')[0]
        w, w0, r = ps[n].detach(), before[n], list(rows)
        assert torch.equal(w[r], torch.zeros_like(w[r]) if mode=='zero' else w0[r]), f"{n} rows {r} not {mode}"
        others = [i for i in range(w.shape[0]) if i not in rows]
        assert not torch.equal(w[others], w0[others]), f"{n}: the other rows did not train"
    for n,rows in (moved or {}).items():
        w, w0 = ps[n].detach(), before[n]
        for i in rows: assert not torch.equal(w[i], w0[i]) and w[i].abs().max() > 0, f"{n} row {i} was guarded"

class CustomLM(nn.Module):
    "A user's LM: token table, a vocab-sized learned position table and an untied head, under names no rule knows"
    def __init__(self, n, tok='tok', pos='pe', head='proj', d=8, padding_idx=None):
        super().__init__()
        self.names = tok, pos, head
        setattr(self, tok, nn.Embedding(n, d, padding_idx=padding_idx))
        setattr(self, pos, nn.Embedding(n, d))
        self.rnn = nn.GRU(d, d, batch_first=True)
        setattr(self, head, nn.Linear(d, n))
    def forward(self, x):
        tok, pos, head = (getattr(self, n) for n in self.names)
        h = tok(x) + pos(torch.arange(x.shape[1], device=x.device))
        return head(self.rnn(h)[0])

NAMES = [('tok', 'pe', 'proj'), ('embed', 'table', 'to_vocab'), ('pos_emb', 'word_emb', 'zzz'), ('wte', 'wpe', 'lm_head')]

@pytest.mark.parametrize('names', NAMES, ids=['-'.join(n) for n in NAMES])
def test_custom_lm_with_vocab(lm_dls, names):
    "Token table and head found by what the batch does, the position table left alone, whatever the names (the third set lies)"
    tok, pos, head = names
    torch.manual_seed(0)
    m = CustomLM(len(lm_dls.vocab), *names)
    learn = quiet(Learner(lm_dls, m, loss_func=CrossEntropyLossFlat(), wd=0.1).padguard())
    rows = tuple(guarded_rows_of(lm_dls.vocab))
    assert isinstance(learn.loss_func, PadCrossEntropyLossFlat) and learn.loss_func.rows == rows
    g = learn.pad_guard.resolve()
    assert g.evidence and g.rows == {f'{tok}.weight': rows, f'{head}.weight': rows, f'{head}.bias': rows}
    before = params_of(m)
    learn.fit(1, 1e-2)
    check_trained(learn, before, g.rows, moved={f'{pos}.weight': [1, 29, 30, 31]})

@pytest.mark.parametrize('names', NAMES[:3], ids=['-'.join(n) for n in NAMES[:3]])
def test_custom_lm_without_vocab(names):
    "No vocab: the pad comes from padding_idx; the head found by evidence"
    tok, pos, head = names
    torch.manual_seed(0)
    m = CustomLM(20, *names, padding_idx=0)
    learn = quiet(Learner(ids_dls(20, 0, lo=1), m, loss_func=CrossEntropyLossFlat(), wd=0.1).padguard())
    g = learn.pad_guard.resolve()
    assert g.rows == {f'{tok}.weight': (0,), f'{head}.weight': (0,), f'{head}.bias': (0,)}
    before = params_of(m)
    learn.fit(1, 1e-2)
    check_trained(learn, before, g.rows, moved={f'{pos}.weight': [0, 1]})

def test_names_alone_guess_wrong():
    "The control for the evidence: with no batch, the name rules take the lying names at their word"
    m = CustomLM(32, 'pos_emb', 'word_emb', 'zzz')
    vocab = ['xxunk', 'xxpad'] + [f't{i}' for i in range(30)]
    test_eq(find_guarded(m, vocab).rows, {'word_emb.weight': (1,)})   # the position table, by its name; the head missed
    x = torch.randint(2, 32, (4, 8))
    test_eq(find_guarded(m, vocab, batch=((x,), (x,))).rows, {'pos_emb.weight': (1,), 'zzz.weight': (1,), 'zzz.bias': (1,)})

def test_resolving_changes_nothing(lm):
    "One resolution on a trained model: every weight, buffer, hidden state, mode and RNG bitwise as before"
    learn = lm()
    learn.fit(1, 1e-2)   # a live hidden state, optimizer state, a model in eval mode after validation
    learn.model.train()
    model = learn.model
    state = {k: v.clone() for k,v in model.state_dict().items()}
    hidden = [[t.clone() for t in h] for h in model[0].hidden]
    rng = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy(), learn.dls.train.rng.getstate()
    g = find_guarded(model, learn.dls.vocab, extra_idxs='fake', batch=learner_batch(learn), scored=learner_scored(learn))
    assert g.evidence
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k,v in state.items())
    assert all(torch.equal(a, b) for h0,h in zip(hidden, model[0].hidden) for a,b in zip(h0, h))
    assert torch.equal(rng[0], torch.get_rng_state()) and rng[1] == random.getstate()
    assert (rng[2] == np.random.get_state()[1]).all() and rng[3] == learn.dls.train.rng.getstate()

def test_classifier_head_is_not_the_vocab(lm_dls):
    "A classifier with as many classes as tokens: its head writes classes (one target per sample), never guarded; loss=True refused"
    class Clas(nn.Module):
        def __init__(self, n, c): super().__init__(); self.emb, self.head = nn.Embedding(n, 8, padding_idx=0), nn.Linear(8, c)
        def forward(self, x): return self.head(self.emb(x).mean(1))
    for c in (2, 20):
        learn = Learner(ids_dls(20, 0, lo=1, label=c), Clas(20, c), loss_func=CrossEntropyLossFlat())
        lf = learn.loss_func
        with pytest.raises(ValueError, match='no output layer of the model writes the token vocab'): learn.padguard(loss=True)
        assert learn.loss_func is lf and not learn.cbs.filter(lambda o: isinstance(o, PadGuard))
        learn.padguard()
        assert learn.loss_func is lf and learn.pad_guard.guarded == {'emb.weight': (0,)}

T = pytest.importorskip('transformers')

def gpt2(tie, vocab=51, pad=50, seed=0):
    cfg = T.GPT2Config(vocab_size=vocab, n_positions=vocab, n_embd=16, n_layer=1, n_head=2, tie_word_embeddings=tie,
                       bos_token_id=0, eos_token_id=0, pad_token_id=pad)
    torch.manual_seed(seed)
    return T.GPT2LMHeadModel(cfg)

class Two(nn.Module):
    "Two Hugging Face LMs in one module, each with its own tables; the loss scores the mean of their logits"
    def __init__(self, a, b, swap=False):
        super().__init__()
        self.a, self.b = (b, a) if swap else (a, b)
    def forward(self, x): return (self.a(input_ids=x).logits + self.b(input_ids=x).logits) / 2

@pytest.mark.parametrize('swap', [False, True])
def test_two_hf_models_in_one_module(swap):
    m = Two(gpt2(True), gpt2(False, seed=1), swap)
    learn = quiet(Learner(ids_dls(50, 50), m, loss_func=CrossEntropyLossFlat(), wd=0.1).padguard())
    tied, untied = ('b', 'a') if swap else ('a', 'b')
    want = {f'{tied}.transformer.wte.weight = {tied}.lm_head.weight': (50,), f'{untied}.transformer.wte.weight': (50,), f'{untied}.lm_head.weight': (50,)}
    order = list(dict(m.named_parameters()))
    test_eq(learn.pad_guard.guarded, dict(sorted(want.items(), key=lambda kv: order.index(kv[0].split(' = ')[0]))))
    before = params_of(m)
    learn.fit(1, 1e-2)
    check_trained(learn, before, want, moved={f'{tied}.transformer.wpe.weight': [50], f'{untied}.transformer.wpe.weight': [50]})

def test_hf_model_on_fastai_text_data(lm_dls):
    "A Hugging Face LM on fastai TextBlock data: the vocab's pad and 'xxfake' rows, in the table and the head"
    m = gpt2(False, vocab=len(lm_dls.vocab), pad=None)
    learn = quiet(Learner(lm_dls, m, loss_func=CrossEntropyLossFlat(), cbs=HFLogits(), wd=0.1).padguard(pad_idx=1))
    rows = tuple(guarded_rows_of(lm_dls.vocab))
    assert rows == (1, 29, 30, 31) and learn.loss_func.rows == rows
    want = {'transformer.wte.weight': rows, 'lm_head.weight': rows}
    test_eq(learn.pad_guard.guarded, want)
    before = params_of(m)
    learn.fit(1, 1e-2)
    check_trained(learn, before, want, moved={'transformer.wpe.weight': [1, 29, 30, 31]})

def test_peft_trainable_tokens_guarded_for_real():
    "PEFT's trainable tokens: the pad's row lives in the adapter's delta; guarded there and in the base table"
    peft = pytest.importorskip('peft')
    pm = peft.get_peft_model(gpt2(True), peft.LoraConfig(target_modules=['c_attn'], trainable_token_indices=[50, 5, 6], r=2))
    class Wrap(nn.Module):
        def __init__(self, m): super().__init__(); self.m = m
        def forward(self, x): return self.m(input_ids=x).logits
    learn = quiet(Learner(ids_dls(50, 50), Wrap(pm), loss_func=CrossEntropyLossFlat(), wd=0.1).padguard())
    g = learn.pad_guard.resolve()
    delta = [t for t in g.targets if 'trainable_tokens_delta' in t.names]
    assert len(delta) == 1 and delta[0].rows == (0,) and 'PEFT trainable tokens [50]' in delta[0].how
    assert isinstance(learn.loss_func, PadCrossEntropyLossFlat) and learn.loss_func.rows == (50,)
    d = delta[0].param
    with torch.no_grad(): d[0] = 0.5   # the pad's delta row, as after plain training
    d0 = d.detach().clone()
    learn.fit(1, 1e-2)
    assert torch.equal(d.detach()[0], torch.zeros(16)) and not torch.equal(d.detach()[1:], d0[1:])
    emb = pm.get_input_embeddings()
    with torch.no_grad(): assert torch.equal(emb(torch.tensor([[50]])), torch.zeros(1, 1, 16)), "the pad's effective embedding is 0"

def test_bert_mlm_pad_zero_ignored_labels_finite_losses():
    "Pad 0 left out of the loss with -100 labels: every recorded loss finite and equal to cross-entropy over the kept columns"
    cfg = T.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                       max_position_embeddings=40, pad_token_id=0)
    torch.manual_seed(0)
    m = T.BertForMaskedLM(cfg)
    dls = ids_dls(40, 0, lo=5, mask_id=4)
    learn = quiet(Learner(dls, m, loss_func=CrossEntropyLossFlat(), cbs=HFLogits(), wd=0.1).padguard())
    assert learn.loss_func.rows == (0,)
    learn.fit(1, 1e-3)
    losses = torch.stack([torch.as_tensor(l) for l in learn.recorder.losses])
    assert torch.isfinite(losses).all() and torch.isfinite(torch.tensor(learn.recorder.values[-1][:2])).all()
    xb, yb = dls.valid.one_batch()
    with torch.no_grad(): logits = m(input_ids=xb).logits.double()
    keep = yb != -100
    ref = F.cross_entropy(logits[..., 1:][keep], yb[keep] - 1)
    assert torch.allclose(learn.loss_func(logits, yb), ref, rtol=1e-10, atol=0)

def test_compiled_models_are_read_eagerly(lm_dls):
    "`module.compile()` and `torch.compile(module)`: the evidence runs the module eagerly (no compile), and leaves it compiled"
    n = len(lm_dls.vocab)
    rows = tuple(guarded_rows_of(lm_dls.vocab))
    m = NanoGPT(n, n); m.compile()
    impl = m._compiled_call_impl
    g = Learner(lm_dls, m, loss_func=CrossEntropyLossFlat()).padguard().pad_guard.resolve()
    assert g.evidence and not g.notes and g.rows == {'transformer.wte.weight = lm_head.weight': rows}
    assert m._compiled_call_impl is impl
    g = Learner(lm_dls, torch.compile(NanoGPT(n, n)), loss_func=CrossEntropyLossFlat()).padguard().pad_guard.resolve()
    assert g.evidence and g.rows == {'_orig_mod.transformer.wte.weight = _orig_mod.lm_head.weight': rows}

class EinsumHead(nn.Module):
    "An untied head applied with einsum, which the evidence does not see as a layer"
    def __init__(self, n, d=8):
        super().__init__()
        self.tok, self.head = nn.Embedding(n, d), nn.Linear(d, n)
        self.rnn = nn.GRU(d, d, batch_first=True)
    def forward(self, x): return torch.einsum('bld,vd->blv', self.rnn(self.tok(x))[0], self.head.weight) + self.head.bias

def test_unseen_output_layer_is_an_error_naming_out(lm_dls):
    "Per-token, vocab-sized logits that no seen layer wrote: never a silent guess; out= names it"
    learn = Learner(lm_dls, EinsumHead(len(lm_dls.vocab)), loss_func=CrossEntropyLossFlat(), wd=0.1)
    lf = learn.loss_func
    with pytest.raises(ValueError, match=r"no layer was seen writing those columns.*out='the.head'"): learn.padguard()
    assert learn.loss_func is lf and not learn.cbs.filter(lambda c: isinstance(c, PadGuard))
    quiet(learn.padguard(out='head'))
    rows = tuple(guarded_rows_of(lm_dls.vocab))
    assert learn.pad_guard.guarded == {'tok.weight': rows, 'head.weight': rows, 'head.bias': rows}
    assert isinstance(learn.loss_func, PadCrossEntropyLossFlat) and learn.loss_func.rows == rows
    before = params_of(learn.model)
    learn.fit(1, 1e-2)
    check_trained(learn, before, learn.pad_guard.guarded)

def test_lora_on_the_token_embedding_guarded():
    "LoRA on the token table (target_modules=['wte']): peft looks up A's transpose, so A's pad column is guarded; the pad's effective row is 0"
    peft = pytest.importorskip('peft')
    pm = peft.get_peft_model(gpt2(True), peft.LoraConfig(target_modules=['c_attn', 'wte'], r=4))
    class Wrap(nn.Module):
        def __init__(self, m): super().__init__(); self.m = m
        def forward(self, x): return self.m(input_ids=x).logits
    emb = pm.get_input_embeddings()
    A = emb.lora_embedding_A['default']
    with torch.no_grad(): A.normal_()  # peft starts A at 0; a trained adapter's pad column is not
    learn = quiet(Learner(ids_dls(50, 50), Wrap(pm), loss_func=CrossEntropyLossFlat(), wd=0.1).padguard())
    g = learn.pad_guard.current_resolution()
    cols = [t for t in g.targets if t.param is A]
    assert len(cols) == 1 and cols[0].dim == 1 and cols[0].rows == (50,) and 'columns' in repr(cols[0])
    learn.fit(1, 1e-2)
    assert torch.equal(A.detach()[:, 50], torch.zeros(4)) and (A.detach()[:, :50] != 0).all()
    with torch.no_grad(): assert torch.equal(emb(torch.tensor([[50]])), torch.zeros(1, 1, 16)), "the pad's effective embedding is 0"

class ExpandHead(nn.Module):
    "An LM that scores one position's logits broadcast over the batch: what the loss scores is an `expand` of the head's result"
    def __init__(self, n=32, d=8): super().__init__(); self.emb, self.head = nn.Embedding(n, d, padding_idx=1), nn.Linear(d, n)
    def forward(self, x): return self.head(self.emb(x)[:1]).expand(x.shape[0], -1, -1)

def test_a_broadcast_view_of_the_head_is_found(lm_dls):
    "Logits that are `.expand` of the output layer's result (more elements than it wrote) are still that layer's"
    learn = Learner(lm_dls, ExpandHead(), loss_func=CrossEntropyLossFlat())
    learn.padguard()
    g = learn.pad_guard.current_resolution()
    assert g.rows == {'emb.weight': (1, 29, 30, 31), 'head.weight': (1, 29, 30, 31), 'head.bias': (1, 29, 30, 31)}
    assert 'writes the logits the loss scores' in repr(g)

def test_a_renamed_pad_token_keeps_the_fake_rows_guarded_or_says_how(lm_dls):
    "'xxpad' renamed in the vocab: extra_idxs='fake' can't read the 'xxfake' rows, so it's an error naming them; named, they are guarded"
    dls = protein_lm_dls(n=300, bs=16, seq_len=16)
    dls.vocab[1] = '<pad>'
    set_seed(0)
    learn = quiet(language_model_learner(dls, AWD_LSTM, config=small_lm_config(), pretrained=False))
    lf = learn.loss_func
    with pytest.raises(ValueError, match=r"'xxfake' rows \[29, 30, 31\] but no 'xxpad'.*extra_idxs=\[29, 30, 31\]"): learn.padguard()
    assert learn.loss_func is lf and not any(isinstance(c, PadGuard) for c in learn.cbs)
    learn.padguard(extra_idxs=[29, 30, 31])
    assert learn.loss_func.rows == (1, 29, 30, 31)

def test_printing_a_guarded_learner_runs_no_model(lm):
    "repr of the guard (and of learn.cbs) reads the kept decision: no forward pass, before or after a fit"
    learn = lm().padguard()
    calls = []
    h = learn.model.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        s = repr(learn.pad_guard) + repr(learn.cbs)
        assert 'rows [1, 29, 30, 31]' in s and 'fused: on' in s and calls == []
        learn.fit(1, 1e-2)
        n = len(calls)
        s = repr(learn.pad_guard) + repr(learn.cbs) + repr(learn.pad_guard.guarded)
        assert 'rows [1, 29, 30, 31]' in s and len(calls) == n
        manual = lm(cbs=PadGuard())
        manual.model.register_forward_pre_hook(lambda m, a: calls.append(1))
        n = len(calls)
        assert 'rows not found yet' in repr(manual.pad_guard) and len(calls) == n
    finally: h.remove()
