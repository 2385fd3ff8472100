"pad_audit's numbers against counts made independently, and PadMonitor (issue: see it)"
import torch, pytest
from fastai.text.all import *
from fastai_padguard.all import *
from conftest import RecordOps, SYNC_OPS
from fastai_padguard.data import *
from fastai_padguard.train_rows import RowTrainer

def test_lm_audit_matches_independent_counts(lm_dls):
    audit = pad_audit(lm_dls)
    dl = lm_dls.train
    # the stream: every tokenized training text, concatenated
    stream = sum(len(dl.dataset[i][0]) for i in range(len(dl.dataset)))
    fed, seen, pads = 0, set(), 0
    for xb, yb in dl:
        fed += xb.numel()
        seen |= set(xb.flatten().tolist()) | set(yb.flatten().tolist())
        pads += int((xb == 1).sum() + (yb == 1).sum())
    assert audit.is_lm and audit.pad_tokens == pads == 0
    assert audit.stream_tokens == stream
    assert audit.dropped == stream - fed and audit.dropped > 0
    assert [i for i,_ in audit.unseen] == [i for i in range(len(lm_dls.vocab)) if i not in seen]
    assert audit.unseen_fake == [29, 30, 31]
    assert audit.n_batches == len(dl)
    assert 'tokens dropped per epoch' in repr(audit)

@pytest.mark.parametrize('pad_first', [True, False])
def test_classifier_audit_matches_independent_counts(lm_dls, pad_first):
    tb = TextBlock.from_df('text', vocab=lm_dls.vocab, tok=CharTokenizer(), rules=[], n_workers=0, min_freq=1, seq_len=8)
    df = pd.DataFrame({'text': protein_seqs(80, seed=5, min_len=5, max_len=40), 'label': ['a','b']*40})
    dls = DataBlock(blocks=(tb, CategoryBlock), get_x=ColReader('text'), get_y=ColReader('label'),
                    splitter=RandomSplitter(seed=0)).dataloaders(df, bs=8, num_workers=0, shuffle=False)
    dls.train.before_batch.fs[0].pad_first = pad_first
    audit = pad_audit(dls)
    fracs, before, after, total = [], 0, 0, 0
    for xb, _ in dls.train:
        fracs.append((xb == 1).float().mean().item())
        total += int((xb == 1).sum())
        for row in xb.tolist():
            i = 0
            while i < len(row) and row[i] == 1: i += 1
            j = len(row)
            while j > i and row[j-1] == 1: j -= 1
            before += i; after += len(row) - j
    assert not audit.is_lm and audit.pad_tokens == total > 0
    assert torch.allclose(audit.pad_frac, torch.tensor(fracs))
    assert (audit.pad_before, audit.pad_after) == (before, after)
    assert audit.pad_side == ('first' if before >= after else 'last')
    if pad_first: assert before > 0
    else: assert before == 0 and audit.pad_side == 'last'

def test_audit_needs_vocab():
    dls = DataLoaders.from_dsets([(torch.zeros(3).long(),)*2]*4, bs=2)
    with pytest.raises(ValueError, match='needs text DataLoaders with a vocab'): pad_audit(dls)

def test_monitor_plain_vs_guarded(lm):
    plain = lm(wd=0.1, cbs=PadMonitor('fake')); plain.fit(1, 1e-2)
    guarded = lm(wd=0.1, cbs=PadMonitor('fake')).padguard(); guarded.fit(1, 1e-2)
    n = len(plain.dls.train)
    v, g = plain.pad_monitor.values, guarded.pad_monitor.values
    assert v.shape == g.shape == (n, 4) and plain.pad_monitor.rows == (1, 29, 30, 31)
    assert (v[:, 0] > 0).all() and (v[-1] >= v[0]).all()
    assert torch.equal(g, torch.zeros(n, 4))
    # the last recorded value is the real change of the pad row over the fit
    ax = plain.pad_monitor.plot()
    assert len(ax.lines) == 2

def test_monitor_records_no_host_sync(lm):
    learn = lm(cbs=PadMonitor('fake'))
    learn.fit(1, 1e-2)
    mon = learn.pad_monitor
    learn.training = True
    b = learn.dls.one_batch(); learn.xb, learn.yb = b[:1], b[1:]
    mon.before_fit(); mon.before_batch()
    rec = RecordOps()
    with rec:
        for _ in range(3): mon.after_step()
    assert rec.ops and not SYNC_OPS & set(rec.ops)
    mon.after_fit()
    assert mon.values.shape == (3, 4)

# ---- untrained and unused rows (issue 17, its audit part) ----
def test_row_audit_finds_planted_rows_and_none_in_a_trained_model(lm):
    learn = lm(wd=0.1).padguard()
    learn.fit(1, 1e-2)
    name = '0.encoder.weight = 0.encoder_dp.emb.weight = 1.decoder.weight'
    clean = row_audit(learn, max_batches=0)
    assert clean.untrained == {name: []} and clean.guarded == {name: [1, 29, 30, 31]}
    w = learn.model[0].encoder.weight
    with torch.no_grad(): w[[5, 12]] = 0; w[20] = 1e-9
    audit = row_audit(learn)
    assert audit.untrained == {name: [5, 12, 20]}
    assert audit.unused[name] == [0, 2, 3, 4, 5, 6, 7, 8], "the specials this tokenizer never emits (pad guarded, left out)"
    assert 1 not in audit.unused[name] and 29 not in audit.untrained[name]

def test_init_untrained_rows_is_the_mean_of_the_trained_rows(lm):
    learn = lm(wd=0.1).padguard()
    learn.fit(1, 1e-2)
    w = learn.model[0].encoder.weight
    with torch.no_grad(): w[[5, 12]] = 0
    trained = [i for i in range(32) if i not in (1, 5, 12, 29, 30, 31)]
    mean = w.detach()[trained].double().mean(0)
    done = init_untrained_rows(learn)
    assert list(done.values()) == [[5, 12]]
    assert torch.allclose(w.detach()[5].double(), mean, rtol=0, atol=1e-7) and torch.equal(w.detach()[5], w.detach()[12])
    assert torch.equal(w.detach()[[1, 29, 30, 31]], torch.zeros(4, 32)), "guarded rows untouched"
    assert all(not r for r in row_audit(learn, max_batches=0).untrained.values())

def test_row_audit_untied_tables_each_on_their_own():
    "An untied Hugging Face LM: the input table and the head are audited apart; rows planted in the head only"
    T = pytest.importorskip('transformers')
    from conftest import ids_dls, HFLogits
    cfg = T.GPT2Config(vocab_size=51, n_positions=16, n_embd=16, n_layer=1, n_head=2, tie_word_embeddings=False, pad_token_id=50)
    torch.manual_seed(0)
    m = T.GPT2LMHeadModel(cfg)
    learn = Learner(ids_dls(50, 50), m, loss_func=CrossEntropyLossFlat(), cbs=HFLogits()).padguard()
    with torch.no_grad(): m.lm_head.weight[[7, 9]] = 0
    audit = row_audit(learn, max_batches=0)
    assert audit.untrained == {'transformer.wte.weight': [], 'lm_head.weight': [7, 9]}
    init_untrained_rows(learn, audit)
    trained = [i for i in range(51) if i not in (7, 9, 50)]
    assert torch.allclose(m.lm_head.weight.detach()[7], m.lm_head.weight.detach()[trained].mean(0))

def test_init_untrained_rows_refuses_an_all_untrained_table(lm_dls):
    learn = Learner(lm_dls, nn.Sequential(nn.Embedding(32, 4, padding_idx=1)), loss_func=CrossEntropyLossFlat())
    learn.padguard(loss=False)
    with torch.no_grad(): learn.model[0].weight.zero_()
    with pytest.raises(ValueError, match='every row looks untrained'): init_untrained_rows(learn)

def test_audit_and_init_read_what_the_model_uses_while_rows_train(lm):
    "While rows train, their values live in their own parameter: the audit reads them there, and init writes them there"
    learn = lm(wd=0.1).padguard()
    w = learn.model[0].encoder.weight
    with torch.no_grad(): w[[20, 21, 12]] = 0   # 20, 21: new tokens about to train; 12: an untrained row that stays frozen
    learn.train_rows([20, 21])
    assert row_audit(learn, max_batches=0).untrained['0.encoder.weight = 0.encoder_dp.emb.weight = 1.decoder.weight'] == [12, 20, 21]
    learn.fit(1, 1e-2)
    name = '0.encoder.weight = 0.encoder_dp.emb.weight = 1.decoder.weight'
    assert row_audit(learn, max_batches=0).untrained[name] == [12], "the trained rows are not untrained, though the table's copy is 0"
    rt = learn.cbs.filter(lambda c: isinstance(c, RowTrainer))[0]
    vals = rt.trained.of(w).values
    with torch.no_grad(): vals[1] = 0   # row 21 as the model uses it: untrained again
    done = init_untrained_rows(learn)
    assert done == {name: [12, 21]}
    used = learn.model.state_dict()['0.encoder.weight']
    trained = [i for i in range(32) if i not in (1, 12, 21, 29, 30, 31)]
    assert torch.equal(used[12], used[21]) and torch.allclose(used[21], used[trained].mean(0), atol=1e-7)
    learn.model.eval()
    with torch.no_grad():  # the lookup (fastai's EmbeddingDropout) reads the new value
        assert torch.equal(learn.model[0].encoder_dp(torch.tensor([[21]]))[0, 0], used[21])
