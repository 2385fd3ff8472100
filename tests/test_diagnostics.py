"pad_audit's numbers against counts made independently, and PadMonitor (issue: see it)"
import torch, pytest
from fastai.text.all import *
from fastai_padguard.all import *
from conftest import RecordOps, SYNC_OPS
from fastai_padguard.data import *

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
