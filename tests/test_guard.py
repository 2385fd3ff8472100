"PadGuard and Learner.padguard on real fastai training (issue: core)"
import pickle, sys
import torch, pytest
from fastai.text.all import *
from fastai_padguard.all import *
from fastai_padguard.data import *
from conftest import guarded_rows_of, RecordOps, SYNC_OPS

def test_zero_mode_tied_awd_lstm_fit_one_cycle(lm, lm_dls):
    learn = lm(wd=0.1, cbs=PadGuard())
    enc, dec = learn.model[0].encoder, learn.model[1].decoder
    assert dec.weight is enc.weight
    seen = []
    class Check(Callback):
        order = 99
        def after_step(self):
            seen.append(torch.equal(enc.weight[1], torch.zeros_like(enc.weight[1])) and dec.bias[1].item()==0)
    learn.fit_one_cycle(2, 1e-2, cbs=Check())
    assert len(seen) == 2*len(lm_dls.train) and all(seen)
    assert not torch.equal(enc.weight[2], torch.zeros_like(enc.weight[2]))

def test_freeze_mode_keeps_values_bitwise(lm):
    learn = lm(wd=0.1, cbs=PadGuard(mode='freeze', extra_idxs='fake'))
    w = learn.model[0].encoder.weight
    rows = guarded_rows_of(learn.dls.vocab)
    before, other = w.detach()[rows].clone(), w.detach()[5].clone()
    assert not torch.equal(before, torch.zeros_like(before))
    learn.fit_one_cycle(1, 1e-2)
    assert torch.equal(w.detach()[rows], before)
    assert torch.equal(learn.model[1].decoder.bias.detach()[rows], torch.zeros(len(rows)))  # fastai inits the bias at 0
    assert not torch.equal(w.detach()[5], other)

def test_fake_rows_guarded_and_unguarded_move(lm):
    learn = lm(wd=0.1)
    w = learn.model[0].encoder.weight
    fake = [i for i,t in enumerate(learn.dls.vocab) if t=='xxfake']
    assert len(fake) == 3
    with torch.no_grad(): w[fake] = 0
    learn.fit(1, 1e-2)
    assert w.detach()[fake].abs().max() > 0, "plain fastai moves the xxfake rows"
    learn = lm(wd=0.1, cbs=PadGuard(extra_idxs='fake'))
    learn.fit(1, 1e-2)
    assert torch.equal(learn.model[0].encoder.weight.detach()[fake], torch.zeros(3, w.shape[1]))

class TiedLM(nn.Module):
    "A plain PyTorch tied language model: embedding, GRU, linear decoder sharing the embedding's weight"
    def __init__(self, n, d=16, padding_idx=None):
        super().__init__()
        self.emb = nn.Embedding(n, d, padding_idx=padding_idx)
        self.rnn = nn.GRU(d, d, batch_first=True)
        self.out = nn.Linear(d, n)
        self.out.weight = self.emb.weight
    def forward(self, x): return self.out(self.rnn(self.emb(x))[0])

def test_plain_pytorch_tied_model(lm_dls):
    n = len(lm_dls.vocab)
    learn = Learner(lm_dls, TiedLM(n), loss_func=CrossEntropyLossFlat(), cbs=[], wd=0.1).padguard()
    learn.remove_cb(ProgressCallback); learn.logger = noop
    assert isinstance(learn.loss_func, PadCrossEntropyLossFlat)
    assert list(learn.pad_guard.guarded) == ['emb.weight = out.weight', 'out.bias']
    learn.fit_one_cycle(1, 1e-2)
    rows = guarded_rows_of(lm_dls.vocab)
    assert torch.equal(learn.model.emb.weight.detach()[rows], torch.zeros(len(rows), 16))
    assert torch.equal(learn.model.out.bias.detach()[rows], torch.zeros(len(rows)))

def test_plain_model_without_vocab_uses_padding_idx():
    x = torch.randint(1, 10, (64, 8))
    dls = DataLoaders.from_dsets(list(zip(x, x)), list(zip(x[:16], x[:16])), bs=16)
    learn = Learner(dls, TiedLM(10, padding_idx=0), loss_func=CrossEntropyLossFlat()).padguard()
    learn.remove_cb(ProgressCallback); learn.logger = noop
    assert learn.loss_func.rows == (0,)
    learn.fit(1, 1e-2)
    assert torch.equal(learn.model.emb.weight.detach()[0], torch.zeros(16))

def test_mismatch_error_names_both_numbers(lm_dls):
    learn = language_model_learner(lm_dls, AWD_LSTM, config=small_lm_config(pad_token=0), pretrained=False)
    with pytest.raises(ValueError, match=r"pad index is 1 but embedding '0.encoder' was built with padding_idx=0"):
        learn.padguard()
    with pytest.raises(ValueError, match="pad_idx=0 but the vocab's 'xxpad' is at index 1"):
        learn.padguard(pad_idx=0)
    assert not any(isinstance(c, PadGuard) for c in learn.cbs)

def test_padguard_twice_replaces(lm):
    learn = lm().padguard().padguard(mode='freeze')
    guards = [c for c in learn.cbs if isinstance(c, PadGuard)]
    assert len(guards) == 1 and learn.pad_guard is guards[0] and guards[0].mode == 'freeze'
    assert isinstance(learn.loss_func, PadCrossEntropyLossFlat)

def test_export_load_learner_with_guard(lm, tmp_path):
    learn = lm(wd=0.1, path=tmp_path).padguard()
    learn.fit(1, 1e-2)
    learn.export('lm.pkl')
    learn2 = load_learner(tmp_path/'lm.pkl')
    assert isinstance(learn2.pad_guard, PadGuard) and isinstance(learn2.loss_func, PadCrossEntropyLossFlat)
    learn2.dls = learn.dls
    learn2.remove_cb(ProgressCallback); learn2.logger = noop
    learn2.fit(1, 1e-2)
    w = learn2.model[0].encoder.weight.detach()
    rows = guarded_rows_of(learn.dls.vocab)
    assert torch.equal(w[rows], torch.zeros(len(rows), w.shape[1]))
    assert learn2.model[1].decoder.weight is learn2.model[0].encoder.weight

def test_finds_targets_again_after_model_replaced(lm):
    learn = lm(wd=0.1).padguard()
    learn.fit(1, 1e-2)
    learn.model = get_language_model(AWD_LSTM, len(learn.dls.vocab), config=small_lm_config())
    learn.fit(1, 1e-2)
    assert torch.equal(learn.model[0].encoder.weight.detach()[1], torch.zeros(32))


def test_no_host_device_sync_in_hot_path(lm):
    "The guard's per-batch events and the loss's forward and backward record no op that syncs host and device"
    learn = lm(wd=0.1).padguard()
    learn.fit(1, 1e-2)  # builds once-per-fit state
    guard, lf = learn.pad_guard, learn.loss_func
    learn.training = True
    learn.xb, learn.yb = learn.dls.one_batch()[:1], learn.dls.one_batch()[1:]
    guard.before_fit(); guard.before_batch()
    x = torch.randn(4, 16, len(learn.dls.vocab), requires_grad=True)
    t = torch.randint(0, len(learn.dls.vocab), (4, 16))
    learn.model.zero_grad()
    learn.model[1].decoder.weight.sum().backward()
    rec = RecordOps()
    with rec:
        guard.after_backward()
        guard.write_back()
        loss = lf(x, t)
        loss.backward()
    guard.after_fit()
    assert rec.ops, "the recorder saw nothing: the test would not catch a sync"
    assert {'index_fill_', 'log_softmax' if 'log_softmax' in rec.ops else '_log_softmax', 'exp_'} <= set(rec.ops)
    assert not SYNC_OPS & set(rec.ops), set(rec.ops)
    assert torch.equal(x.grad[..., list(lf.rows)], torch.zeros(4, 16, len(lf.rows)))

def test_sync_recorder_can_fail():
    "The op recorder does see a host sync when there is one"
    rec = RecordOps()
    with rec: torch.ones(3).sum().item()
    assert '_local_scalar_dense' in rec.ops

def test_failed_padguard_leaves_learner_as_it_was(lm):
    learn = lm().padguard(mode='freeze')
    guard, lf = learn.pad_guard, learn.loss_func
    with pytest.raises(ValueError, match="'xxpad' is at index 1"): learn.padguard(pad_idx=0)
    assert [c for c in learn.cbs if isinstance(c, PadGuard)] == [guard] and learn.loss_func is lf

@pytest.mark.parametrize('mode', ['zero', 'freeze'])
def test_only_a_training_fit_changes_weights(lm, mode):
    "validate, get_preds, predict and show_results run before_fit/after_fit but train nothing: every parameter bitwise as it was"
    import matplotlib; matplotlib.use('Agg')
    learn = lm(wd=0.1, metrics=accuracy, cbs=PadMonitor('fake')).padguard(mode=mode)
    with torch.no_grad(): learn.model[0].encoder.weight[[1, 29]] = 0.0998   # a nonzero pad row, as after plain training
    before = {n: p.detach().clone() for n,p in learn.model.named_parameters()}
    learn.validate()
    learn.get_preds(reorder=False)
    learn.predict('MKV', n_words=5, no_bar=True)
    learn.show_results(max_n=2)
    for n,p in learn.model.named_parameters(): assert torch.equal(p.detach(), before[n]), n
    assert learn.pad_monitor.values is None, "the monitor recorded nothing outside training"
    learn.fit(1, 1e-2)
    w = learn.model[0].encoder.weight.detach()
    assert torch.equal(w[[1, 29]], torch.zeros(2, 32) if mode=='zero' else before['0.encoder.weight'][[1, 29]])
    assert learn.pad_monitor.values.shape[0] == len(learn.dls.train)

def test_thread_configuration_trains_validates_exports(lm_dls, tmp_path):
    "The forum thread's setup (drop_mult=0, tied, wd=1e-2) with padguard(): fit, validate, export, load_learner; fastai's own WeightDropout after"
    from fastai.text.models.awdlstm import WeightDropout
    from fastai_padguard.compat import weight_dropout_remedy_needed
    orig = WeightDropout._setweights
    make = lambda: language_model_learner(lm_dls, AWD_LSTM, config=small_lm_config(), drop_mult=0., wd=1e-2, pretrained=False, path=tmp_path)
    if weight_dropout_remedy_needed(make().model):   # the control: plain fastai crashes on this pair (fastai 2.8.12, torch >= 2.13)
        plain = make(); plain.remove_cb(ProgressCallback); plain.logger = noop
        with pytest.raises(Exception, match='weight_hh_l0'): plain.fit(1, 1e-3)
        assert WeightDropout._setweights is orig
    learn = make().padguard()
    learn.remove_cb(ProgressCallback); learn.logger = noop
    learn.fit_one_cycle(1, 1e-3)
    assert WeightDropout._setweights is orig, "fastai's method is back after the fit"
    learn.validate()
    learn.export('thread.pkl')
    learn2 = load_learner(tmp_path/'thread.pkl')
    learn2.predict('MKV', n_words=3, no_bar=True)
    assert WeightDropout._setweights is orig
    rows = guarded_rows_of(lm_dls.vocab)
    for l in (learn, learn2): assert torch.equal(l.model[0].encoder.weight.detach()[rows], torch.zeros(len(rows), 32))

class _ZeroOptimizer(torch.optim.SGD):
    "Stands in for DeepSpeed's ZeRO stage 1/2 optimizer, which keeps its own fp32 master copy of the weights"
_ZeroOptimizer.__module__ = 'deepspeed.runtime.zero.stage_1_and_2'

@pytest.mark.parametrize('how', ['zero3-param', 'zero-optimizer'])
def test_deepspeed_zero_refused_before_any_weight_changes(lm, how):
    "Under DeepSpeed ZeRO the master copy would write the rows over at the next step: refused at the first batch, weights as they were"
    opt_func = partial(OptimWrapper, opt=partial(_ZeroOptimizer, lr=1e-2)) if how == 'zero-optimizer' else Adam
    learn = lm(opt_func=opt_func).padguard()
    if how == 'zero3-param': learn.model[0].encoder.weight.ds_id = 0  # what ZeRO-3 sets on a parameter it partitions
    before = {n: p.detach().clone() for n, p in learn.model.named_parameters()}
    with pytest.raises(RuntimeError, match='DeepSpeed ZeRO'): learn.fit(1, 1e-2)
    for n, p in learn.model.named_parameters(): assert torch.equal(p, before[n]), n
