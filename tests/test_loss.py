"PadCrossEntropyLossFlat against an independent float64 reference, and in fastai training (issue: loss)"
import math, warnings
import torch, pytest
import torch.nn.functional as F
from fastai.text.all import *
from fastai_padguard.all import *
from fastai_padguard.data import *
from conftest import guarded_rows_of, NewStorages

def reference(x, t, rows):
    "Cross-entropy in float64 computed on `x` with the `rows` columns deleted, over positions whose target is not in `rows`"
    x, t = x.reshape(-1, x.shape[-1]).double(), t.reshape(-1)
    cols = [c for c in range(x.shape[1]) if c not in rows]
    keep = [i for i in range(len(t)) if int(t[i]) not in rows]
    xs = x[keep][:, cols]
    lse = torch.stack([torch.logsumexp(r, 0) for r in xs])
    pos = {c:j for j,c in enumerate(cols)}
    return (lse - torch.stack([xs[k, pos[int(t[i])]] for k,i in enumerate(keep)])).mean()

@pytest.mark.parametrize('seed', range(5))
def test_value_matches_float64_reference(seed):
    torch.manual_seed(seed)
    V = 37
    x = torch.randn(3, 11, V, dtype=torch.float64) * 4
    t = torch.randint(0, V, (3, 11)); t[0, :4] = 1; t[2, -1] = 35
    lf = PadCrossEntropyLossFlat(1, extra_idxs=[35, 36])
    loss = lf(x, t)
    assert loss.dtype == torch.float64, "float64 kept through (BaseLoss alone would cast to float32)"
    ref = reference(x, t, {1, 35, 36})
    assert abs((loss - ref).item()) / abs(ref.item()) <= 1e-10

@pytest.mark.parametrize('seed', range(3))
def test_gradient_matches_reference_and_is_exactly_zero_on_guarded_columns(seed):
    torch.manual_seed(seed)
    V = 29
    x = (torch.randn(5, 7, V, dtype=torch.float64) * 3)
    t = torch.randint(0, V, (5, 7)); t[1, 2] = 3
    x1 = x.clone().requires_grad_(); x2 = x.clone().requires_grad_()
    PadCrossEntropyLossFlat(3, extra_idxs=[0, 28])(x1, t).backward()
    reference(x2, t, {0, 3, 28}).backward()
    assert torch.equal(x1.grad[..., [0, 3, 28]], torch.zeros(5, 7, 3, dtype=torch.float64))
    assert (x1.grad - x2.grad).abs().max().item() <= 1e-14
    assert torch.equal(x1.detach(), x), "the logits are left as they were"

def test_float32_against_float64_reference():
    "float32 logits: within float32 rounding of the float64 reference (tolerance 1e-5 relative)"
    torch.manual_seed(0)
    x = torch.randn(4, 9, 50) * 3; t = torch.randint(0, 50, (4, 9))
    loss = PadCrossEntropyLossFlat(1, extra_idxs=[48, 49])(x, t)
    ref = reference(x, t, {1, 48, 49})
    assert abs(loss.item() - ref.item()) / ref.item() < 1e-5

def test_ignore_index_alone_leaks_gradient_to_pad():
    "The premise: CrossEntropyLossFlat(ignore_index=pad) still sends gradient to the pad logit"
    x = torch.randn(2, 5, 10, requires_grad=True); t = torch.randint(2, 10, (2, 5))
    CrossEntropyLossFlat(ignore_index=1)(x, t).backward()
    assert (x.grad[..., 1] != 0).all()

def test_all_pad_batch_is_zero_not_nan():
    x = torch.randn(2, 4, 10, requires_grad=True)
    loss = PadCrossEntropyLossFlat(1)(x, torch.ones(2, 4, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0 and not math.isnan(loss.item())
    assert torch.equal(x.grad, torch.zeros_like(x))

def test_reduction_sum_and_none_match_reference():
    torch.manual_seed(1)
    x = torch.randn(3, 4, 12, dtype=torch.float64); t = torch.randint(0, 12, (3, 4)); t[0,0] = 1
    lf = PadCrossEntropyLossFlat(1, reduction='sum')
    n = (t != 1).sum()
    assert abs(lf(x, t).item() - (reference(x, t, {1}) * n).item()) < 1e-10
    lf.reduction = 'none'
    per = lf(x, t)
    assert per.shape == (12,) and per[0].item() == 0
    assert abs(per.sum().item() - (reference(x, t, {1}) * n).item()) < 1e-10

def test_tied_lm_pad_gradient_exactly_zero_every_step(lm, lm_dls):
    "Trained with padguard() and no weight decay, the loss alone sends exactly 0 gradient to the guarded rows"
    learn = lm(wd=0.).padguard()
    rows = guarded_rows_of(lm_dls.vocab)
    w = learn.model[0].encoder.weight
    seen = []
    class Check(Callback):
        order = PadGuard.order - 1  # before the guard zeroes anything
        def after_backward(self): seen.append(torch.equal(w.grad[rows], torch.zeros(len(rows), w.shape[1])))
    learn.fit_one_cycle(1, 1e-2, cbs=Check())
    assert len(seen) == len(lm_dls.train) and all(seen)

def test_plain_loss_does_send_gradient(lm, lm_dls):
    "Control for the test above: with fastai's loss the same check fails"
    learn = lm(wd=0.)
    learn.loss_func = CrossEntropyLossFlat(ignore_index=1)
    w = learn.model[0].encoder.weight
    seen = []
    class Check(Callback):
        def after_backward(self): seen.append(w.grad[1].abs().max().item())
    learn.fit(1, 1e-2, cbs=Check())
    assert all(s > 0 for s in seen)

def _boost_guarded_logits(learn, rows):
    with torch.no_grad(): learn.model[1].decoder.bias[rows] = 8.

def test_predict_never_emits_pad_or_fake(lm, lm_dls):
    rows = guarded_rows_of(lm_dls.vocab)
    learn = lm().padguard()
    _boost_guarded_logits(learn, rows)  # make them the likeliest classes: only the loss's activation keeps them out
    out = learn.predict('MKV', n_words=300, temperature=3., no_bar=True, decoder=lambda o: o)
    assert not ({'xxpad', 'xxfake'} & set(out.split()))
    preds, _, decoded = learn.get_preds(with_decoded=True, reorder=False)  # fastai 2.8.12 LM get_preds fails to reorder decoded
    assert torch.equal(preds[..., rows], torch.zeros(*preds.shape[:-1], len(rows)))
    assert not torch.isin(decoded, torch.tensor(rows)).any()

def test_predict_control_plain_loss_emits_pad(lm, lm_dls):
    learn = lm()
    _boost_guarded_logits(learn, guarded_rows_of(lm_dls.vocab))
    out = learn.predict('MKV', n_words=100, temperature=3., no_bar=True, decoder=lambda o: o)
    assert {'xxpad', 'xxfake'} & set(out.split())

def test_metrics_work(lm):
    learn = lm(metrics=[accuracy, Perplexity()]).padguard()
    learn.fit(1, 1e-2)
    _, vloss, acc, ppl = learn.recorder.values[-1]
    assert 0 < acc < 1 and abs(ppl - math.exp(vloss)) < 1e-3 * ppl

@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_half_logits_as_under_mixed_precision(dtype):
    "Half logits are handled in float32 (as F.cross_entropy under autocast); the gradient keeps the input dtype"
    torch.manual_seed(0)
    x = (torch.randn(2, 6, 40) * 3).to(dtype).requires_grad_()
    t = torch.randint(0, 40, (2, 6)); t[0, 0] = 1
    loss = PadCrossEntropyLossFlat(1, extra_idxs=[39])(x, t)
    loss.backward()
    assert loss.dtype == torch.float32 and x.grad.dtype == dtype
    assert torch.equal(x.grad[..., [1, 39]], torch.zeros(2, 6, 2, dtype=dtype))
    ref = reference(x.detach().float(), t, {1, 39})
    assert abs(loss.item() - ref.item()) / ref.item() < 1e-6

# ---- the user's loss carried over, and heads that save their output (issue: models) ----
def reference_full(x, t, rows, ignore_index=-100, weight=None, label_smoothing=0., reduction='mean'):
    "F.cross_entropy in float64 on the logits with `rows` deleted; targets in `rows` or equal to ignore_index dropped"
    x, t = x.reshape(-1, x.shape[-1]).double(), t.reshape(-1)
    cols = [c for c in range(x.shape[1]) if c not in rows]
    remap = torch.full((x.shape[1],), -1, dtype=torch.long); remap[cols] = torch.arange(len(cols))
    keep = (t != ignore_index) & ~torch.isin(t, torch.tensor(sorted(rows)))
    tt = torch.where(keep, remap[t.clamp(min=0)], -100)
    w = None if weight is None else weight.double()[cols]
    return F.cross_entropy(x[:, cols], tt, weight=w, ignore_index=-100, label_smoothing=label_smoothing, reduction=reduction)

CASES = [dict(), dict(ignore_index=5), dict(reduction='sum'), dict(reduction='none'), dict(weight=True), dict(label_smoothing=0.1),
         dict(weight=True, label_smoothing=0.2, reduction='sum'), dict(ignore_index=5, weight=True, label_smoothing=0.05)]

@pytest.mark.parametrize('kw', CASES, ids=[str(c) for c in CASES])
def test_loss_options_match_float64_reference(kw):
    "Value and gradient against F.cross_entropy in float64 with the guarded columns deleted; targets equal to ignore_index (-100 by default) ignored"
    torch.manual_seed(0)
    V = 23
    kw = dict(kw)
    if kw.get('weight'): kw['weight'] = torch.rand(V, dtype=torch.float64) + .2
    x = torch.randn(3, 9, V, dtype=torch.float64) * 3
    t = torch.randint(0, V, (3, 9)); t[0, :2] = kw.get('ignore_index', -100); t[1, 0] = 1; t[2, 3] = 5; t[2, 4] = 22
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    lf = PadCrossEntropyLossFlat(1, extra_idxs=[22], **kw)
    l1 = lf(x1, t); l2 = reference_full(x2, t, {1, 22}, **kw)
    assert l1.dtype == torch.float64
    assert (l1 - l2).abs().max().item() <= 1e-10 * max(1, l2.abs().max().item())
    (l1.sum() if l1.dim() else l1).backward(); (l2.sum() if l2.dim() else l2).backward()
    assert torch.equal(x1.grad[..., [1, 22]], torch.zeros(3, 9, 2, dtype=torch.float64))
    assert (x1.grad - x2.grad).abs().max().item() <= 1e-12
    assert torch.equal(x1.detach(), x)

HEADS = {'log_softmax': lambda h: torch.log_softmax(h, -1), 'sigmoid': torch.sigmoid, 'tanh': torch.tanh, 'exp': torch.exp, 'relu': torch.relu}

@pytest.mark.parametrize('head', list(HEADS))
def test_heads_that_save_their_output(head):
    "Where plain cross-entropy works, the pad-aware loss works too, with the reference's gradient"
    torch.manual_seed(1)
    h = torch.randn(4, 6, 17, dtype=torch.float64, requires_grad=True)
    t = torch.randint(2, 16, (4, 6))
    g1, = torch.autograd.grad(PadCrossEntropyLossFlat(1, extra_idxs=[16])(HEADS[head](h), t), h)
    g2, = torch.autograd.grad(reference_full(HEADS[head](h), t, {1, 16}), h)
    assert (g1 - g2).abs().max().item() <= 1e-12

class Head(nn.Module):
    def __init__(self, act): super().__init__(); self.lin, self.act = nn.Linear(8, 17).double(), act
    def forward(self, x): return self.act(self.lin(x))

@pytest.mark.slow
@pytest.mark.parametrize('head', ['log_softmax', 'tanh'])
@pytest.mark.parametrize('what', ['model.compile()', 'torch.compile(loss)'])
def test_compiled(head, what):
    "A compiled model whose last op saves its output, and a compiled loss: the reference's gradient"
    torch.manual_seed(2)
    m = Head(HEADS[head]); x = torch.randn(12, 8, dtype=torch.float64); t = torch.randint(2, 16, (12,))
    lf = PadCrossEntropyLossFlat(1, extra_idxs=[16])
    loss = lf
    if what == 'model.compile()': m.compile()
    else: loss = torch.compile(lambda o, t: lf(o, t))
    out = loss(m(x), t); out.backward()
    g1 = m.lin.weight.grad.clone(); m.zero_grad()
    ref = Head(HEADS[head]); ref.load_state_dict({k.replace('_orig_mod.', ''): v for k,v in m.state_dict().items()})
    reference_full(ref(x), t, {1, 16}).backward()
    assert abs(out.item() - reference_full(ref(x), t, {1, 16}).item()) <= 1e-10
    assert (g1 - ref.lin.weight.grad).abs().max().item() <= 1e-12

def test_padguard_carries_the_loss_over(lm):
    learn = lm()
    learn.loss_func = CrossEntropyLossFlat(ignore_index=12, reduction='sum', weight=torch.ones(32), label_smoothing=0.1)
    learn.padguard()
    lf = learn.loss_func
    assert isinstance(lf, PadCrossEntropyLossFlat)
    assert (lf.ignore_index, lf.reduction, lf.label_smoothing) == (12, 'sum', 0.1) and torch.equal(lf.weight, torch.ones(32))
    learn.fit(1, 1e-2)

def test_padguard_leaves_a_loss_it_cannot_carry_and_says_so(lm):
    learn = lm()
    learn.loss_func = LabelSmoothingCrossEntropyFlat()
    with pytest.warns(UserWarning, match='left the loss'): learn.padguard()
    assert isinstance(learn.loss_func, LabelSmoothingCrossEntropyFlat)
    assert 'left the loss' in repr(learn.pad_guard)
    with pytest.raises(ValueError, match="can't carry over the loss"): learn.padguard(loss=True)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        learn.padguard(loss=False)   # no note when the user said so
    assert 'left the loss' not in repr(learn.pad_guard)

@pytest.mark.parametrize('mode', ['zero', 'freeze'])
def test_untied_lm_gets_the_loss_and_its_decoder_guarded(lm, lm_dls, mode):
    learn = lm(wd=0.1, config=small_lm_config(tie_weights=False)).padguard(mode=mode)
    assert isinstance(learn.loss_func, PadCrossEntropyLossFlat)
    enc, dec = learn.model[0].encoder.weight, learn.model[1].decoder.weight
    assert dec is not enc
    rows = guarded_rows_of(lm_dls.vocab)
    before = [p.detach()[rows].clone() for p in (enc, dec, learn.model[1].decoder.bias)]
    learn.fit(1, 1e-2)
    for p, b in zip((enc, dec, learn.model[1].decoder.bias), before):
        assert torch.equal(p.detach()[rows], torch.zeros_like(b) if mode=='zero' else b)

def reference_all(x, t, rows, ignore_index=-100, reduction='mean', weight=None, smoothing=0.):
    """float64 reference for every option: the `rows` columns deleted from the logits, targets in `rows` or equal to
    `ignore_index` dropped, then torch's own cross-entropy on what is left (class weights and smoothing over the kept columns)"""
    x, t = x.reshape(-1, x.shape[-1]).double(), t.reshape(-1)
    cols = [c for c in range(x.shape[1]) if c not in rows]
    new = {c:j for j,c in enumerate(cols)}
    keep = torch.tensor([int(v) != ignore_index and int(v) not in rows for v in t])
    tt = torch.tensor([new.get(int(v), -100) for v in t])
    w = None if weight is None else weight.double()[cols]
    res = F.cross_entropy(x[:, cols], tt, weight=w, reduction='none', label_smoothing=smoothing, ignore_index=-100) * keep
    if reduction == 'none': return res
    if reduction == 'sum': return res.sum()
    den = keep.double().sum() if w is None else (w[tt.clamp(min=0)] * keep).sum()
    return res.sum() / den

PAD0 = [dict(pad=0, extra=[]), dict(pad=0, extra=[5, 9]), dict(pad=3, extra=[0]), dict(pad=2, extra=[0, 1])]

@pytest.mark.parametrize('reduction', ['mean', 'sum', 'none'])
@pytest.mark.parametrize('case', PAD0, ids=lambda c: f"pad{c['pad']}-extra{c['extra']}")
@pytest.mark.parametrize('opts', [{}, dict(smoothing=0.1), dict(weight=True), dict(ignore_index=7)], ids=['plain', 'smoothing', 'weight', 'ignore7'])
def test_row_zero_left_out_with_ignored_targets(case, reduction, opts):
    "Column 0 left out and targets ignored (-100, a custom ignore_index, the pad itself): finite, equal to the float64 reference"
    torch.manual_seed(0)
    V = 12
    x = torch.randn(3, 6, V, dtype=torch.float64) * 3
    t = torch.randint(0, V, (3, 6))
    ig = opts.get('ignore_index', -100)
    t[0, 1] = ig; t[1, 0] = case['pad']; t[2, 3] = ig; t[2, 4] = 0
    weight = torch.rand(V, dtype=torch.float64) + .5 if opts.get('weight') else None
    kw = dict(reduction=reduction, label_smoothing=opts.get('smoothing', 0.), weight=weight, ignore_index=ig)
    x1 = x.clone().requires_grad_(); x2 = x.clone().requires_grad_()
    loss = PadCrossEntropyLossFlat(case['pad'], extra_idxs=case['extra'], **kw)(x1, t)
    rows = {case['pad'], *case['extra']}
    ref = reference_all(x2, t, rows, ig, reduction, weight, opts.get('smoothing', 0.))
    assert torch.isfinite(loss).all()
    assert torch.allclose(loss, ref.reshape(loss.shape), rtol=1e-10, atol=1e-12), (loss, ref)
    (loss.sum() if reduction=='none' else loss).backward()
    (ref.sum() if reduction=='none' else ref).backward()
    assert torch.isfinite(x1.grad).all() and (x1.grad - x2.grad).abs().max() <= 1e-12
    assert torch.equal(x1.grad[..., sorted(rows)], torch.zeros(3, 6, len(rows), dtype=torch.float64))

def test_issue_example_pad_zero_minus_100():
    "The report: PadCrossEntropyLossFlat(0) on targets [3, -100, 5, 6, 7, 8] was nan"
    torch.manual_seed(0)
    x = torch.randn(6, 10, dtype=torch.float64)
    t = torch.tensor([3, -100, 5, 6, 7, 8])
    loss = PadCrossEntropyLossFlat(0)(x, t)
    assert torch.isfinite(loss) and torch.allclose(loss, reference_all(x, t, {0}), rtol=1e-10)

def test_the_logits_are_held_once():
    "The loss masks the logits in place and restores them: forward and backward write one new logits-sized tensor (the log-probabilities, reused as the gradient)"
    x = torch.randn(64, 500, requires_grad=True)
    z, t = x * 1, torch.randint(0, 500, (64,))  # logits made by an op, as a model's are
    with NewStorages(z.numel()) as rec: g, = torch.autograd.grad(PadCrossEntropyLossFlat(1)(z, t), z)
    assert rec.n == 1, rec.n
    assert torch.equal(g[:, 1], torch.zeros(64))
