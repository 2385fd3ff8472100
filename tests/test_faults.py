"""No step lands unguarded (issue 15): the write-back is part of the optimizer step itself, so interrupts, exceptions and
cancellations leave the rows exact, in the weights, in a checkpoint saved right after, and in the next fit; one truth for the
guard and the loss across fits; a guard's lifecycle (added mid-fit, two guards)."""
import torch, pytest
from fastai.text.all import *
from fastai_padguard.all import *
from fastai_padguard.data import *
from conftest import quiet, guarded_rows_of, params_of, lm_dls_of, ids_dls

ROWS = [1, 29, 30, 31]

def pretrained(lm, unguarded:bool):
    "A tied AWD-LSTM LM; with `unguarded`, after a plain fit that moved the pad rows and left optimizer state on them"
    learn = lm(wd=0.1)
    if unguarded:
        learn.fit(1, 1e-2)
        assert learn.model[0].encoder.weight.detach()[ROWS].abs().max() > 0
    return learn

def expected(learn, mode):
    w = learn.model[0].encoder.weight.detach()
    return torch.zeros(len(ROWS), w.shape[1]) if mode=='zero' else w[ROWS].clone()

def rows_now(learn): return learn.model[0].encoder.weight.detach()[ROWS]

class EveryStep(Callback):
    "Records, after each step as every later callback sees it, whether the rows are exact"
    order = 99
    def __init__(self, want): self.want, self.seen = want, []
    def after_step(self): self.seen.append(torch.equal(rows_now(self.learn), self.want))

def check_checkpoint_and_next_fit(learn, want, tmp_path):
    assert torch.equal(rows_now(learn), want)
    learn.path = tmp_path; learn.save('after_fault')
    sd = torch.load(tmp_path/'models'/'after_fault.pth', weights_only=False)
    sd = sd.get('model', sd)
    assert torch.equal(sd['0.encoder.weight'][ROWS], want), "the checkpoint saved right after the fault holds exact rows"
    learn.fit(1, 1e-2)
    assert torch.equal(rows_now(learn), want), "the next fit starts and ends exact"

@pytest.mark.parametrize('unguarded', [False, True], ids=['fresh', 'after-unguarded-fit'])
@pytest.mark.parametrize('mode', ['zero', 'freeze'])
def test_ctrl_c_inside_opt_step(lm, mode, unguarded, tmp_path):
    "KeyboardInterrupt raised inside the optimizer's step, after it updated the weights: the rows are written back all the same"
    learn = pretrained(lm, unguarded).padguard(mode=mode, extra_idxs=[29, 30, 31])
    want = expected(learn, mode)
    if learn.opt is None: learn.create_opt()
    real, calls = learn.opt.step, []
    def step(*args, **kwargs):
        real(*args, **kwargs); calls.append(1)
        if len(calls)==3: raise KeyboardInterrupt
    learn.opt.step = step
    with pytest.raises(KeyboardInterrupt): learn.fit(1, 1e-2)
    assert len(calls)==3
    check_checkpoint_and_next_fit(learn, want, tmp_path)

class Boom(Exception): pass
class RaiseAt(Callback):
    "Raises `exc` at `event` on the given batches"
    def __init__(self, event, exc, iters=(2,), order=5): self.event, self.exc, self.iters, self.order = event, exc, iters, order
    def __getattr__(self, name):
        if name == getattr(self, 'event', None):
            def f():
                if self.training and self.iter in self.iters: raise self.exc('injected')
            return f
        return super().__getattr__(name)

@pytest.mark.parametrize('unguarded', [False, True], ids=['fresh', 'after-unguarded-fit'])
@pytest.mark.parametrize('mode', ['zero', 'freeze'])
def test_exception_from_callback_before_the_guard(lm, mode, unguarded, tmp_path):
    "An exception from a callback ordered before the guard, in after_step: the step had already written the rows back"
    learn = pretrained(lm, unguarded).padguard(mode=mode, extra_idxs=[29, 30, 31])
    want = expected(learn, mode)
    with pytest.raises(Exception, match='injected'): learn.fit(1, 1e-2, cbs=RaiseAt('after_step', Boom, order=5))
    check_checkpoint_and_next_fit(learn, want, tmp_path)

EVENTS = ['before_batch', 'after_pred', 'after_loss', 'before_backward', 'after_backward', 'before_step', 'after_step']
CASES = [(e, CancelBatchException) for e in EVENTS] + [('before_step', CancelStepException), ('before_backward', CancelBackwardException)]

@pytest.mark.parametrize('mode', ['zero', 'freeze'])
@pytest.mark.parametrize('event,exc', CASES, ids=[f'{e}-{x.__name__}' for e,x in CASES])
def test_cancel_at_each_event(lm, mode, event, exc):
    "fastai's Cancel*Exception at every event of a batch, after an unguarded fit: rows exact after every step and at the end"
    learn = pretrained(lm, True).padguard(mode=mode, extra_idxs=[29, 30, 31])
    want = expected(learn, mode)
    rec = EveryStep(want)
    learn.fit(1, 1e-2, cbs=[RaiseAt(event, exc, iters=range(0, 1000, 2)), rec])
    assert rec.seen and all(rec.seen) and torch.equal(rows_now(learn), want)

def test_write_back_is_what_holds_the_rows(lm, monkeypatch):
    "Control: with the step's write-back disabled, optimizer state from an unguarded fit moves the zeroed rows"
    import fastai_padguard.ops as ops
    monkeypatch.setattr(ops.GuardedStep, '__call__', lambda self, *a, **k: self.step(*a, **k))
    learn = pretrained(lm, True).padguard(extra_idxs=[29, 30, 31])
    rec = EveryStep(expected(learn, 'zero'))
    learn.fit(1, 1e-2, cbs=rec)
    assert rec.seen and not any(rec.seen)

def test_gradient_rows_zero_when_callbacks_read_them(lm):
    "With the plain loss (pad logit in the softmax), every callback from before_step on sees zero gradient in the guarded rows"
    learn = lm(wd=0.1).padguard(loss=False, extra_idxs=[29, 30, 31])
    assert type(learn.loss_func) is CrossEntropyLossFlat
    seen = []
    class Grads(Callback):
        order = -5   # before the guard (12) and before GradientClip: the zeroing happened in after_backward already
        def before_step(self):
            g = self.learn.model[0].encoder.weight.grad
            seen.append((torch.equal(g[ROWS], torch.zeros_like(g[ROWS])), g.abs().max() > 0))
    learn.fit(1, 1e-2, cbs=Grads())
    assert seen and all(z and nz for z,nz in seen)

def test_gradient_zeroing_control(lm, monkeypatch):
    "Control: without the guard's after_backward, the pad row's gradient reaches before_step"
    monkeypatch.setattr(PadGuard, 'after_backward', lambda self: None)
    learn = lm(wd=0.1).padguard(loss=False)
    seen = []
    class Grads(Callback):
        def before_step(self): seen.append(self.learn.model[0].encoder.weight.grad[1].abs().max() > 0)
    learn.fit(1, 1e-2, cbs=Grads())
    assert any(seen)

# ---- one truth for guard and loss ----
def test_vocab_change_between_fits_moves_the_loss_rows_too(lm_dls):
    "A vocab with 7 'xxfake' rows, then one with 3: the loss follows, so real tokens 25..28 are back in the softmax and the targets"
    small = lm_dls_of('ACDEFGHIKLMNPQRS')
    fake = lambda v: [i for i,t in enumerate(v) if t=='xxfake']
    assert len(small.vocab) == len(lm_dls.vocab) == 32 and fake(small.vocab) == list(range(25, 32)) and fake(lm_dls.vocab) == [29, 30, 31]
    learn = quiet(language_model_learner(small, AWD_LSTM, config=small_lm_config(), pretrained=False, wd=0.1)).padguard()
    learn.fit(1, 1e-2)
    assert learn.loss_func.rows == (1, *range(25, 32))
    learn.dls = lm_dls
    learn.fit(1, 1e-2)
    assert learn.loss_func.rows == (1, 29, 30, 31)
    assert learn.pad_guard.resolution.rows['1.decoder.bias'] == (1, 29, 30, 31)
    w = learn.model[0].encoder.weight.detach()
    assert (w[25:29].abs().amax(1) > 0).all() and torch.equal(w[[1, 29, 30, 31]], torch.zeros(4, w.shape[1]))
    _, yb = lm_dls.valid.one_batch()
    p = learn.loss_func.activation(learn.model.eval()(lm_dls.valid.one_batch()[0])[0].detach())
    assert (p.gather(-1, yb[..., None]) > 0).all(), "no validation target has probability 0"

def test_second_padguard_sets_the_loss_rows(lm):
    learn = lm().padguard(extra_idxs=[5, 6])
    assert learn.loss_func.rows == (1, 5, 6)
    learn.padguard()
    assert learn.loss_func.rows == (1, 29, 30, 31)

def test_hand_built_loss_that_disagrees_raises_before_any_change(lm):
    learn = lm(wd=0.1, cbs=PadGuard(extra_idxs='fake'))
    learn.loss_func = PadCrossEntropyLossFlat(1, extra_idxs=[5])
    before = params_of(learn.model)
    with pytest.raises(ValueError, match=r"leaves out columns \[1, 5\] but the output layer's guarded rows are \[1, 29, 30, 31\]"): learn.fit(1, 1e-2)
    assert all(torch.equal(p.detach(), before[n]) for n,p in learn.model.named_parameters())
    learn = lm()
    learn.loss_func = PadCrossEntropyLossFlat(1, extra_idxs=[5])
    with pytest.raises(ValueError, match=r"learn.padguard\(loss=True\)"): learn.padguard()

@pytest.mark.parametrize('n_cls', [2, 40])
def test_loss_true_on_text_classifier_refused(n_cls):
    "A fastai text classifier: no output layer writes the token vocab, so loss=True is an error and nothing changes"
    seqs = protein_seqs(160, min_len=5, max_len=30)
    df = pd.DataFrame({'text': seqs, 'label': [f'c{i % n_cls}' for i in range(160)], 'is_valid': [i >= 128 for i in range(160)]})
    tb = TextBlock.from_df('text', tok=CharTokenizer(), rules=[], n_workers=0, min_freq=1)
    dls = DataBlock(blocks=(tb, CategoryBlock), get_x=ColReader('text'), get_y=ColReader('label'),
                    splitter=ColSplitter('is_valid')).dataloaders(df, bs=16, num_workers=0)
    assert len(dls.vocab[1]) == n_cls
    learn = text_classifier_learner(dls, AWD_LSTM, config=dict(awd_lstm_clas_config, emb_sz=32, n_hid=64, n_layers=2), pretrained=False)
    lf = learn.loss_func
    with pytest.raises(ValueError, match='no output layer of the model writes the token vocab'): learn.padguard(loss=True)
    assert learn.loss_func is lf and not learn.cbs.filter(lambda c: isinstance(c, PadGuard))
    learn.padguard()
    assert learn.loss_func is lf and list(learn.pad_guard.guarded) == ['0.module.encoder.weight = 0.module.encoder_dp.emb.weight']

# ---- lifecycle ----
@pytest.mark.parametrize('mode', ['zero', 'freeze'])
def test_guard_added_during_a_fit_starts_at_the_next_step(lm, mode):
    learn = pretrained(lm, True)
    seen = []
    class AddGuard(Callback):
        order = 90
        def after_batch(self):
            if self.training and self.iter == 2: self.learn.add_cb(PadGuard(mode=mode, extra_idxs='fake'))
        def after_step(self):
            if self.iter > 2: seen.append(rows_now(self.learn).clone())
    learn.fit(1, 1e-2, cbs=AddGuard())
    assert len(seen) > 3 and all(torch.equal(s, seen[0]) for s in seen)
    if mode == 'zero': assert torch.equal(seen[0], torch.zeros_like(seen[0]))

def test_two_guards_raise_at_fit_start_naming_both(lm):
    learn = lm(wd=0.1, cbs=[PadGuard(), PadGuard(mode='freeze')])
    before = params_of(learn.model)
    with pytest.raises(ValueError, match=r"2 PadGuards \(pad_guard mode='zero', pad_guard mode='freeze'\)|2 PadGuards \(pad_guard mode='freeze', pad_guard mode='zero'\)"):
        learn.fit(1, 1e-2)
    assert all(torch.equal(p.detach(), before[n]) for n,p in learn.model.named_parameters())

def test_removed_guard_leaves_the_optimizer_alone(lm):
    "After remove_cb (even of a guard whose fit was interrupted), training is plain fastai again"
    learn = pretrained(lm, True).padguard()
    with pytest.raises(Exception, match='injected'): learn.fit(1, 1e-2, cbs=RaiseAt('after_step', Boom))
    learn.remove_cb(learn.pad_guard)
    learn.fit(1, 1e-2)
    assert rows_now(learn).abs().max() > 0

def test_padguard_loss_false_keeps_following_the_loss_it_built(lm):
    "padguard() then padguard(loss=False): the loss the first built still follows the guard's rows"
    learn = lm().padguard(extra_idxs=[5])
    lf = learn.loss_func
    learn.padguard(loss=False)
    assert learn.loss_func is lf and learn.pad_guard.pad_loss is lf
    learn.fit(1, 1e-2)
    assert lf.rows == (1, 29, 30, 31)
