"The guarantee holds through what fastai does, and misuse fails early and clearly (issue: robustness)"
import math
import torch, pytest
import numpy as np
from fastai.text.all import *
from fastai.callback.training import GradientAccumulation, GradientClip
from fastai_padguard.all import *
from fastai_padguard.data import *
from conftest import guarded_rows_of, cuda, NanoGPT

class RowsCheck(Callback):
    "After every step (and at the end of fit), record whether the guarded rows are as guaranteed"
    order = 99
    def __init__(self, rows, mode='zero'): store_attr(); self.ok, self.ref = [], None
    def _w(self): m = getattr(self.learn.model, 'module', self.learn.model); return m[0].encoder.weight if isinstance(m, nn.Sequential) else m.emb.weight
    def before_fit(self): self.ref = self._w().detach()[self.rows].clone()
    def _check(self):
        w = self._w().detach()[self.rows]
        self.ok.append(torch.equal(w, torch.zeros_like(w)) if self.mode=='zero' else torch.equal(w, self.ref))
    def after_step(self): self._check()
    def after_fit(self): self._check()

def _guarded(lm, mode='zero', **kw):
    learn = lm(wd=0.1, **kw).padguard(mode=mode)
    chk = RowsCheck(guarded_rows_of(learn.dls.vocab), mode)
    learn.add_cb(chk)
    return learn, chk

@pytest.mark.parametrize('mode', ['zero', 'freeze'])
@pytest.mark.parametrize('how', ['fit', 'fit_one_cycle', 'fit_flat_cos', 'fine_tune', 'discriminative'])
def test_training_loops(lm, mode, how):
    learn, chk = _guarded(lm, mode)
    if how == 'fit': learn.fit(1, 1e-2)
    elif how == 'fit_one_cycle': learn.fit_one_cycle(1, 1e-2)
    elif how == 'fit_flat_cos': learn.fit_flat_cos(1, 1e-2)
    elif how == 'fine_tune': learn.fine_tune(1, 1e-2, freeze_epochs=1)
    else:
        learn.freeze_to(-1); learn.fit(1, slice(1e-3, 1e-2))
        learn.unfreeze(); learn.fit(1, slice(1e-4, 1e-2))
    assert len(chk.ok) > 10 and all(chk.ok)

def test_lr_find_restores_and_keeps_rows(lm):
    learn, chk = _guarded(lm, 'freeze')
    w = learn.model[0].encoder.weight
    before = w.detach().clone()
    learn.lr_find(num_it=20, show_plot=False)
    assert all(chk.ok) and torch.equal(w.detach()[chk.rows], before[chk.rows])

def test_bf16_on_cpu(lm):
    learn, chk = _guarded(lm)
    learn.to_bf16()
    learn.fit(1, 1e-2)
    assert all(chk.ok)

def test_cancelled_steps_as_mixed_precision_skips_them(lm):
    "MixedPrecision raises CancelStepException for inf/NaN gradients; a step cancelled that way keeps the guarantee"
    class SkipOdd(Callback):
        order = 11
        def before_step(self):
            if self.iter % 2: raise CancelStepException()
    learn, chk = _guarded(lm, 'freeze')
    learn.fit(1, 1e-2, cbs=SkipOdd())
    assert len(chk.ok) > 10 and all(chk.ok)

def test_gradient_accumulation(lm):
    learn, chk = _guarded(lm)
    learn.fit(1, 1e-2, cbs=GradientAccumulation(n_acc=48))
    assert all(chk.ok) and len(chk.ok) < len(learn.dls.train)

def test_gradient_clip_norm_excludes_guarded_rows(lm, monkeypatch):
    learn, chk = _guarded(lm)
    rows = chk.rows
    seen = []
    orig = nn.utils.clip_grad_norm_
    def spy(params, *a, **k):
        params = list(params)
        enc = learn.model[0].encoder.weight
        by_hand = []
        for p in params:
            if p.grad is None: continue
            g = p.grad.detach().double()
            if p is enc or p is learn.model[1].decoder.bias:
                keep = [i for i in range(g.shape[0]) if i not in rows]
                g = g[keep]
            by_hand.append(g.flatten())
        hand = torch.cat(by_hand).norm()
        full = torch.cat([p.grad.detach().double().flatten() for p in params if p.grad is not None]).norm()
        norm = orig(params, *a, **k)
        seen.append((norm.item(), hand.item(), full.item()))
        return norm
    monkeypatch.setattr(nn.utils, 'clip_grad_norm_', spy)
    learn.fit(1, 1e-2, cbs=GradientClip(0.1))
    assert seen and all(abs(n-h) <= 1e-5*h for n,h,_ in seen), seen[:3]
    assert all(chk.ok)

def test_gradient_clip_norm_control_without_guard(lm, monkeypatch):
    "Control: without the guard the clipping norm includes the pad row, so the check above can fail"
    learn = lm(wd=0.1)
    enc = learn.model[0].encoder.weight
    seen = []
    orig = nn.utils.clip_grad_norm_
    def spy(params, *a, **k):
        seen.append(enc.grad[1].abs().max().item()); return orig(params, *a, **k)
    monkeypatch.setattr(nn.utils, 'clip_grad_norm_', spy)
    learn.fit(1, 1e-2, cbs=GradientClip(0.1))
    assert all(s > 0 for s in seen)

def test_save_load_resume(lm, tmp_path):
    learn, chk = _guarded(lm, path=tmp_path)
    learn.fit(1, 1e-2)
    learn.save('mid')
    learn2, chk2 = _guarded(lm, path=tmp_path)
    learn2.load('mid')
    assert torch.equal(learn2.model[0].encoder.weight, learn.model[0].encoder.weight)
    learn2.fit(1, 1e-2)
    assert all(chk.ok) and all(chk2.ok)

@pytest.mark.parametrize('pad_first', [True, False])
def test_encoder_to_classifier(lm, lm_dls, tmp_path, pad_first):
    learn, _ = _guarded(lm, path=tmp_path)
    learn.fit(1, 1e-2)
    learn.save_encoder('enc')
    tb = TextBlock.from_df('text', vocab=lm_dls.vocab, tok=CharTokenizer(), rules=[], n_workers=0, min_freq=1, seq_len=16)
    df = pd.DataFrame({'text': protein_seqs(60, seed=3, min_len=10, max_len=50), 'label': ['a','b']*30})
    dls = DataBlock(blocks=(tb, CategoryBlock), get_x=ColReader('text'), get_y=ColReader('label'),
                    splitter=RandomSplitter(seed=0)).dataloaders(df, bs=8, num_workers=0)
    pc = dls.train.before_batch.fs[0]
    assert isinstance(pc, Pad_Chunk)
    pc.pad_first = pad_first
    clas = text_classifier_learner(dls, AWD_LSTM, config=small_clas_config(), pretrained=False, path=tmp_path, wd=0.1)
    clas.remove_cb(ProgressCallback); clas.logger = noop
    clas.load_encoder('enc').padguard()
    enc = clas.model[0].module.encoder
    assert torch.equal(enc.weight[1], torch.zeros(32))
    zeros, pads = [], []
    class Check(Callback):
        order = 99
        def after_batch(self):
            x = self.xb[0]
            pads.append(((x[:, 0]==1).sum().item(), (x[:, -1]==1).sum().item()))
        def after_step(self): zeros.append(torch.equal(enc.weight[[1,29,30,31]], torch.zeros(4, 32)))
    clas.fine_tune(1, 1e-2, freeze_epochs=1, cbs=Check())
    first, last = sum(p[0] for p in pads), sum(p[1] for p in pads)
    assert zeros and all(zeros) and first + last > 0
    if pad_first: assert first > 0, "whole pad chunks before the text"
    else: assert first == 0

class FailAt(Callback):
    order = 50
    def __init__(self, exc, k): store_attr(); self.n = 0
    def after_batch(self):
        if self.training:
            self.n += 1
            if self.n == self.k: raise self.exc

@pytest.mark.parametrize('exc', [RuntimeError('boom'), CancelFitException(), KeyboardInterrupt()])
@pytest.mark.parametrize('mode', ['zero', 'freeze'])
def test_interrupted_fit_then_fit_again(lm, exc, mode):
    learn, chk = _guarded(lm, mode)
    try: learn.fit(1, 1e-2, cbs=FailAt(exc, 5))
    except (RuntimeError, KeyboardInterrupt): pass
    assert len(chk.ok) >= 5 and all(chk.ok)
    w = learn.model[0].encoder.weight.detach()[chk.rows]
    assert torch.equal(w, torch.zeros_like(w)) if mode=='zero' else torch.equal(w, chk.ref)
    chk.ok.clear()
    learn.fit(1, 1e-2)
    assert len(chk.ok) > 10 and all(chk.ok)

class TwoEmb(nn.Module):
    "Token embedding plus a second vocab-sized embedding (e.g. an input-side feature table), both padded"
    def __init__(self, n, d=8, pad=1, bag=False):
        super().__init__()
        self.emb = nn.Embedding(n, d, padding_idx=pad)
        self.emb2 = (nn.EmbeddingBag(n, d, padding_idx=pad, mode='sum') if bag else nn.Embedding(n, d, padding_idx=pad))
        self.bag = bag
        self.out = nn.Linear(d, n); self.out.weight = self.emb.weight
    def forward(self, x):
        e2 = self.emb2(x.reshape(-1, 1)).reshape(*x.shape, -1) if self.bag else self.emb2(x)
        return self.out(self.emb(x) + e2)

@pytest.mark.parametrize('bag', [False, True])
def test_several_embeddings_and_embedding_bag(lm_dls, bag):
    learn = Learner(lm_dls, TwoEmb(len(lm_dls.vocab), bag=bag), loss_func=CrossEntropyLossFlat(), wd=0.1).padguard()
    learn.remove_cb(ProgressCallback); learn.logger = noop
    assert list(learn.pad_guard.guarded) == ['emb.weight = out.weight', 'emb2.weight', 'out.bias']
    learn.fit(1, 1e-2)
    rows = guarded_rows_of(lm_dls.vocab)
    for p in (learn.model.emb.weight, learn.model.emb2.weight):
        assert torch.equal(p.detach()[rows], torch.zeros(len(rows), 8))

def test_sparse_gradients_rejected_before_fit(lm_dls):
    m = TwoEmb(len(lm_dls.vocab)); m.emb2 = nn.Embedding(len(lm_dls.vocab), 8, padding_idx=1, sparse=True)
    learn = Learner(lm_dls, m, loss_func=CrossEntropyLossFlat())
    with pytest.raises(ValueError, match="sparse=True.*build it with sparse=False"): learn.padguard()

class _TwoTables(nn.Module):
    def __init__(self): super().__init__(); self.a, self.b = nn.Embedding(20, 4), nn.Embedding(20, 4)
def _ids_dls():
    x = torch.randint(0, 20, (32, 5))
    return DataLoaders.from_dsets(list(zip(x, x)), list(zip(x, x)), bs=8)

# The misuse table in nbs/08_robustness.ipynb lists these cases; each must fail before training with the value and the fix.
def _with_loss(d, loss_func):
    learn = language_model_learner(d, AWD_LSTM, config=small_lm_config(), pretrained=False)
    learn.loss_func = loss_func
    return learn
def _bad_vocab_model(lm_dls): return Learner(lm_dls, TwoEmb(len(lm_dls.vocab)-8), loss_func=CrossEntropyLossFlat())
MISUSE = [
    ("mode", lambda d: PadGuard(mode='zeros'), ValueError, "mode='zeros' is not one of 'zero'"),
    ("negative pad_idx", lambda d: PadGuard(pad_idx=-1), ValueError, "pad_idx=-1 is negative"),
    ("pad_idx past the vocab", lambda d: language_model_learner(d, AWD_LSTM, config=small_lm_config(), pretrained=False).padguard(pad_idx=99), ValueError, "pad_idx=99 is out of range for a vocab of 32"),
    ("no embedding", lambda d: Learner(d, nn.Linear(16, 32), loss_func=CrossEntropyLossFlat()).padguard(), ValueError, "No token embedding"),
    ("no vocab, no padding_idx", lambda d: Learner(DataLoaders.from_dsets([(torch.zeros(4).long(),)*2]*8, [(torch.zeros(4).long(),)*2]*2, bs=4), nn.Embedding(5, 3), loss_func=CrossEntropyLossFlat()).padguard(), ValueError, "padguard() and PadGuard are for text models"),
    ("vocab 'xxpad' != padding_idx", lambda d: language_model_learner(d, AWD_LSTM, config=small_lm_config(pad_token=0), pretrained=False).padguard(), ValueError, "pad index is 1 but embedding '0.encoder' was built with padding_idx=0"),
    ("extra_idxs out of range", lambda d: language_model_learner(d, AWD_LSTM, config=small_lm_config(), pretrained=False).padguard(extra_idxs=[40]), ValueError, "Row 40 is out of range"),
    ("extra_idxs not ints", lambda d: PadGuard(extra_idxs=['a']), TypeError, "extra_idxs item='a' is not an int"),
    ("loss pad != guard pad", lambda d: _with_loss(d, PadCrossEntropyLossFlat(0)), ValueError, "The loss ignores pad index 0 but the guard's pad index is 1"),
    ("embedding smaller than vocab", _bad_vocab_model, ValueError, "has 24 rows but the vocab has 32 tokens"),
    ("can't tell the token embedding", lambda d: Learner(_ids_dls(), _TwoTables(), loss_func=CrossEntropyLossFlat()).padguard(pad_idx=0), ValueError, "Name it: learn.padguard(emb="),
    ("emb names no module", lambda d: Learner(_ids_dls(), _TwoTables(), loss_func=CrossEntropyLossFlat()).padguard(pad_idx=0, emb='c'), ValueError, "emb='c': the model has no module of that name"),
    ("label_smoothing out of range", lambda d: PadCrossEntropyLossFlat(1, label_smoothing=2), ValueError, "label_smoothing=2 is not between 0 and 1"),
    ("chunk not a positive int", lambda d: PadGuard(chunk=0), ValueError, "chunk=0: pass a number of tokens per chunk"),
]

@pytest.mark.parametrize('case', MISUSE, ids=[m[0] for m in MISUSE])
def test_misuse_clear_error(lm_dls, case):
    _, f, exc, msg = case
    with pytest.raises(exc) as e:
        r = f(lm_dls)
        if isinstance(r, Learner): r.padguard()
    assert msg in str(e.value), str(e.value)

def test_smaller_embedding_fails_at_fit_too(lm_dls):
    learn = _bad_vocab_model(lm_dls); learn.add_cb(PadGuard())
    with pytest.raises(ValueError, match='24 rows but the vocab has 32'): learn.fit(1)

# ---- CUDA (run where a GPU is lent; skipped cleanly elsewhere) ----
@cuda
@pytest.mark.parametrize('prec', ['fp16', 'bf16'])
def test_cuda_mixed_precision(lm_dls, prec):
    dls = protein_lm_dls(n=300, bs=16, seq_len=16, device='cuda')
    learn = language_model_learner(dls, AWD_LSTM, config=small_lm_config(), pretrained=False, wd=0.1).padguard()
    learn.remove_cb(ProgressCallback); learn.logger = noop
    learn = learn.to_fp16() if prec == 'fp16' else learn.to_bf16()
    chk = RowsCheck(guarded_rows_of(dls.vocab)); learn.add_cb(chk)
    learn.fit_one_cycle(1, 1e-2)
    assert all(chk.ok) and learn.model[0].encoder.weight.is_cuda

@cuda
def test_cuda_loss_matches_reference():
    x = (torch.randn(64, 1000, device='cuda', dtype=torch.float64)*3).requires_grad_()
    t = torch.randint(0, 1000, (64,), device='cuda'); t[:5] = 1
    loss = PadCrossEntropyLossFlat(1, extra_idxs=[998, 999])(x, t); loss.backward()
    keep = (t != 1) & (t < 998)
    cols = [c for c in range(1000) if c not in (1, 998, 999)]
    remap = torch.full((1000,), -1, device='cuda'); remap[cols] = torch.arange(len(cols), device='cuda')
    ref = F.cross_entropy(x.detach()[keep][:, cols], remap[t[keep]])
    assert abs((loss - ref).item()) / ref.item() < 1e-10
    assert torch.equal(x.grad[:, [1, 998, 999]], torch.zeros(64, 3, device='cuda', dtype=torch.float64))

@cuda
def test_cuda_no_sync_short_fit():
    "A short LM fit with guard and loss under torch.cuda.set_sync_debug_mode('error'), progress bar and recorder off"
    dls = protein_lm_dls(n=300, bs=16, seq_len=16, device='cuda')
    learn = language_model_learner(dls, AWD_LSTM, config=small_lm_config(), pretrained=False, wd=0.1, default_cbs=False).padguard()
    learn.model.cuda()  # without default_cbs, no TrainEvalCallback moves it
    learn.fit(1, 1e-2)  # warm-up: once-per-fit work happens here
    torch.cuda.synchronize()
    learn.pad_guard.before_fit(); learn.pad_guard.before_train()
    xb, yb = dls.one_batch()
    learn.model.train()
    torch.cuda.set_sync_debug_mode('error')
    try:
        for _ in range(3):
            learn.model.reset()
            out = learn.model(xb)[0]
            loss = learn.loss_func(out, yb)
            loss.backward()
            learn.pad_guard.after_backward()
            learn.opt.step(); learn.opt.zero_grad()
    finally: torch.cuda.set_sync_debug_mode(0)
    learn.pad_guard.after_fit()

class Overflow(Callback):
    "Put an inf into a gradient every third step, after the guard zeroed its rows: GradScaler then skips that step"
    order = 13
    def __init__(self): self.n, self.skipped = 0, 0
    def after_cancel_step(self): self.skipped += 1
    def after_backward(self):
        self.n += 1
        if self.n % 3 == 0: self.learn.model[0].rnns[0].weight_hh_l0_raw.grad[0, 0] = float('inf')

@cuda
@pytest.mark.parametrize('mode', ['zero', 'freeze'])
def test_cuda_fp16_skipped_steps_keep_rows_exact(lm_dls, mode):
    "to_fp16(): steps that GradScaler skips on overflow (fastai cancels them) keep the rows exact too"
    dls = protein_lm_dls(n=300, bs=16, seq_len=16, device='cuda')
    learn = language_model_learner(dls, AWD_LSTM, config=small_lm_config(), pretrained=False, wd=0.1).padguard(mode=mode).to_fp16()
    learn.remove_cb(ProgressCallback); learn.logger = noop
    chk = RowsCheck(guarded_rows_of(dls.vocab), mode); learn.add_cb(chk)
    ov = Overflow()
    learn.fit(1, 1e-2, cbs=ov)
    n = len(dls.train)
    assert len(chk.ok) == n + 1 and all(chk.ok)
    assert ov.skipped >= n//3, "GradScaler skipped the overflowing steps"

@cuda
def test_cuda_compiled_model_with_guard():
    "A torch.compile'd model (module.compile()) trains with padguard(): rows exact, loss swapped"
    dls = protein_lm_dls(n=200, bs=16, seq_len=16, device='cuda')
    n = len(dls.vocab)
    m = NanoGPT(n, n).cuda(); m.compile()
    class Plain(Callback):
        "Hand the compiled model plain tensors, not fastai's TensorText"
        def before_batch(self): self.learn.xb = tuple(x.as_subclass(Tensor) for x in self.xb)
    learn = Learner(dls, m, loss_func=CrossEntropyLossFlat(), wd=0.1, cbs=Plain()).padguard()
    learn.remove_cb(ProgressCallback); learn.logger = noop
    rows = guarded_rows_of(dls.vocab)
    learn.fit(1, 1e-2)
    w = m.transformer.wte.weight.detach()
    assert torch.equal(w[rows], torch.zeros(len(rows), w.shape[1], device='cuda'))
    assert isinstance(learn.loss_func, PadCrossEntropyLossFlat)


# ---- not a text model: one clear error before anything changes (issue 18) ----
def _vision_learner():
    "A vision Learner: image tensors in, class labels (fastai's vocab of class names) out"
    x = torch.rand(32, 3, 8, 8); y = torch.arange(32) % 2
    dls = DataLoaders.from_dsets([(TensorImage(x[i]), TensorCategory(y[i])) for i in range(24)],
                                 [(TensorImage(x[i]), TensorCategory(y[i])) for i in range(24, 32)], bs=8)
    dls.vocab = ['cat', 'dog']
    return Learner(dls, nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)), loss_func=CrossEntropyLossFlat())

def _tabular_learner():
    from fastai.tabular.all import TabularDataLoaders, tabular_learner, Categorify, Normalize
    rng = np.random.default_rng(0)
    df = pd.DataFrame({'a': rng.choice(['x', 'y', 'z'], 64), 'b': rng.choice(['u', 'v'], 64), 'c': rng.normal(size=64), 'y': rng.choice(['p', 'q'], 64)})
    dls = TabularDataLoaders.from_df(df, cat_names=['a', 'b'], cont_names=['c'], y_names='y', procs=[Categorify, Normalize], bs=16)
    return tabular_learner(dls, layers=[8])

def _features_learner():
    x = torch.randn(64, 10); y = (x[:, 0] > 0).long()
    return Learner(DataLoaders.from_dsets(list(zip(x[:48], y[:48])), list(zip(x[48:], y[48:])), bs=16), nn.Linear(10, 2), loss_func=CrossEntropyLossFlat())

@pytest.mark.parametrize('make', [_vision_learner, _tabular_learner, _features_learner], ids=['vision', 'tabular', 'features'])
def test_not_a_text_model_says_so_first(make):
    learn = make()
    lf, cbs = learn.loss_func, list(learn.cbs)
    with pytest.raises(ValueError, match=r"padguard\(\) and PadGuard are for text models.*learn.padguard\(pad_idx=0, emb="): learn.padguard()
    assert learn.loss_func is lf and list(learn.cbs) == cbs
    learn.add_cb(PadGuard())
    with pytest.raises(ValueError, match='for text models'): learn.fit(1)
