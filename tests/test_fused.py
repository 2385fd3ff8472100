"""The fused output layer and loss (issue 16): in training, the output layer runs inside `PadCrossEntropyLossFlat` a chunk
of tokens at a time. Checked against an independent float64 reference for every option of the loss, against the unfused
path in training for every model family, and for what reads the logits (validation, get_preds, metrics, callbacks)."""
import os, pickle, warnings
import torch, pytest
import torch.nn.functional as F
from fastai.text.all import *
from fastai_padguard.all import *
from fastai_padguard.data import *
from fastai_padguard.fused import FusedLogits, FusedHead, fused_head
from fastai_padguard.chunked import chunk_rows
from conftest import Float64Recorder, first_step, rel_err, LargestOutput, NanoGPT, ids_dls, HFLogits, RecordOps, SYNC_OPS, quiet

def reference(h, w, b, t, rows, ignore_index=-100, reduction='mean', weight=None, label_smoothing=0.):
    "float64: the logits with the `rows` columns deleted, targets in `rows` ignored, then torch's own cross-entropy"
    z = F.linear(h.double(), w.double(), None if b is None else b.double())
    cols = [c for c in range(z.shape[1]) if c not in rows]
    remap = torch.full((z.shape[1],), -100, dtype=torch.long); remap[cols] = torch.arange(len(cols))
    tt = torch.where((t == ignore_index) | torch.isin(t, torch.tensor(sorted(rows))), -100, remap[t.clamp_min(0)])
    return F.cross_entropy(z[:, cols], tt, weight=None if weight is None else weight.double()[cols], ignore_index=-100,
                           reduction=reduction, label_smoothing=label_smoothing)

OPTIONS = [dict(), dict(reduction='sum'), dict(reduction='none'), dict(label_smoothing=0.1), dict(ignore_index=5),
           dict(weight='w'), dict(weight='w', label_smoothing=0.2, reduction='sum'), dict(weight='w', ignore_index=5, reduction='none')]

@pytest.mark.parametrize('opts', OPTIONS, ids=lambda o: ','.join(f'{k}={v}' for k,v in o.items()) or 'defaults')
@pytest.mark.parametrize('tied', [True, False])
@pytest.mark.parametrize('bias', [True, False])
@pytest.mark.parametrize('rows', [(1,), (0, 2, 40)], ids=['pad1', 'pad0+2'])
def test_every_option_against_float64_reference(opts, tied, bias, rows):
    "Values <= 1e-10 relative, gradients of h, weight (tied: through the embedding too) and bias <= 1e-12; left-out rows exactly 0"
    torch.manual_seed(len(rows) + 2*tied + 4*bias)
    N, d, V = 53, 8, 41
    opts = {**opts, 'weight': torch.rand(V, dtype=torch.float64) + .5} if opts.get('weight') == 'w' else opts
    emb = torch.randn(V, d, dtype=torch.float64, requires_grad=True)
    w = emb if tied else torch.randn(V, d, dtype=torch.float64, requires_grad=True)
    b = torch.randn(V, dtype=torch.float64, requires_grad=True) if bias else None
    ids = torch.randint(0, V, (N,))
    t = torch.randint(0, V, (N,)); t[:5] = rows[0]; t[7] = 5; t[9] = opts.get('ignore_index', -100); t[11] = rows[-1]
    lf = PadCrossEntropyLossFlat(rows[0], extra_idxs=list(rows[1:]), **opts)
    params = [emb] + ([] if tied else [w]) + ([b] if bias else [])
    def run(f):
        h = torch.tanh(F.embedding(ids, emb) @ torch.eye(d, dtype=torch.float64))  # h depends on the (tied) table too
        out = f(h)
        go = torch.linspace(.5, 2, out.numel(), dtype=torch.float64).reshape(out.shape) if out.dim() else torch.tensor(.7, dtype=torch.float64)
        return out, torch.autograd.grad(out, params, go)
    head = FusedHead(nn.Linear(d, V), chunk=6)   # 9 chunks, the last one short
    l1, g1 = run(lambda h: lf(FusedLogits(h, w, b, head), t))
    l2, g2 = run(lambda h: reference(h, w, b, t, rows, **opts))
    assert rel_err(l1, l2) <= 1e-10
    for a, e in zip(g1, g2): assert rel_err(a, e) <= 1e-12
    if not tied: assert torch.equal(g1[1][list(rows)], torch.zeros(len(rows), d, dtype=torch.float64))
    if bias: assert torch.equal(g1[-1][list(rows)], torch.zeros(len(rows), dtype=torch.float64))
    assert not head.computed, "the logits were never computed whole"

def test_chunks_never_hold_the_logits():
    "The largest tensor any op writes is one chunk of logits, not tokens x vocab (control: the unfused loss writes them)"
    torch.manual_seed(0)
    N, d, V = 96, 8, 300
    h = torch.randn(N, d, requires_grad=True); w = torch.randn(V, d, requires_grad=True); t = torch.randint(0, V, (N,))
    lf = PadCrossEntropyLossFlat(1)
    for fused, limit in [(True, 10*V), (False, N*V)]:
        rec = LargestOutput()
        with rec:
            x = FusedLogits(h, w, None, FusedHead(nn.Linear(d, V), chunk=10)) if fused else F.linear(h, w)
            lf(x, t).backward()
        assert rec.numel == limit, (fused, rec.numel)

def test_softcap_and_casts_are_applied_per_chunk():
    "Gemma 2's soft-cap tanh(x/c)*c and a cast after the head stay lazy and give the reference's loss and gradient"
    torch.manual_seed(1)
    h = torch.randn(30, 8, dtype=torch.float64, requires_grad=True); w = torch.randn(25, 8, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 25, (30,)); lf = PadCrossEntropyLossFlat(0, label_smoothing=.1)
    head = FusedHead(nn.Linear(8, 25), chunk=4)
    x = (torch.tanh(FusedLogits(h, w, None, head) / 3.) * 3.).double().contiguous()
    assert type(x) is FusedLogits and len(x.fns) == 3, "a cast to the dtype they have is the logits themselves, as in torch"
    l1 = lf(x, t); g1 = torch.autograd.grad(l1, (h, w))
    l2 = lf(torch.tanh(F.linear(h, w) / 3.) * 3., t); g2 = torch.autograd.grad(l2, (h, w))
    assert rel_err(l1, l2) <= 1e-12 and all(rel_err(a, e) <= 1e-12 for a, e in zip(g1, g2))
    assert not head.computed

def test_anything_else_gets_the_logits_computed():
    "Indexing, softmax, a tensor added: the real logits, with autograd; the head notes it"
    h = torch.randn(6, 4, requires_grad=True); w = torch.randn(9, 4, requires_grad=True); b = torch.randn(9)
    head = FusedHead(nn.Linear(4, 9))
    x = FusedLogits(h, w, b, head)
    assert x.shape == (6, 9) and x.dtype == torch.float32 and x.requires_grad and len(x) == 6
    assert not head.computed
    ref = F.linear(h, w, b)
    assert torch.equal(x[2:4], ref[2:4]) and torch.equal(x.softmax(-1), ref.softmax(-1)) and torch.equal(x + ref, 2*ref)
    assert head.computed
    (x * torch.ones(9)).sum().backward()
    assert torch.equal(h.grad, torch.ones(6, 9) @ w.detach())

def test_bf16_autocast_on_cpu():
    "Under autocast the chunks compute in its dtype, as the layer would: within bfloat16 rounding of plain cross-entropy"
    torch.manual_seed(0)
    h = torch.randn(40, 16, requires_grad=True); w = (torch.randn(50, 16)*.3).requires_grad_(); t = torch.randint(0, 50, (40,))
    lf = PadCrossEntropyLossFlat(1)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        x = FusedLogits(h, w, None, FusedHead(nn.Linear(16, 50), chunk=7))
        assert x.dtype == torch.bfloat16
        l1 = lf(x, t)
        ref = F.linear(h, w)
        l2 = lf(ref, t)
    g1 = torch.autograd.grad(l1, (h, w)); g2 = torch.autograd.grad(l2, (h, w))
    assert abs(l1.item() - l2.item()) <= 1e-2 * abs(l2.item())
    assert all(g.dtype == torch.float32 for g in g1)
    assert all(rel_err(a, e) <= 2e-2 for a, e in zip(g1, g2))

def test_backpropagating_twice_says_so():
    h = torch.randn(6, 4, requires_grad=True); w = torch.randn(9, 4, requires_grad=True)
    loss = PadCrossEntropyLossFlat(1)(FusedLogits(h, w, None), torch.randint(0, 9, (6,)))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match='fused=False'): loss.backward()

# --- in fastai training: every family, against the unfused path ---

def awd(tie=True, f64=False, **kw):
    "A tied (or untied) AWD-LSTM LM learner, from seed 0; `f64`: in float64, with fastai's smoothed loss in float64 too"
    set_seed(0, reproducible=True)
    dls = protein_lm_dls(n=300, bs=16, seq_len=16)
    learn = quiet(language_model_learner(dls, AWD_LSTM, config={**small_lm_config(), 'tie_weights': tie}, pretrained=False, **kw))
    if f64:
        learn.model.double(); learn.model.reset()  # its hidden state in float64 too
        learn.add_cb(Float64Recorder())
    return learn

def hf_lm(kind):
    T = pytest.importorskip('transformers')
    torch.manual_seed(0)
    if kind.startswith('gpt2'):
        cfg = T.GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=1, n_head=2, tie_word_embeddings=kind=='gpt2-tied')
        m = T.GPT2LMHeadModel(cfg); m.resize_token_embeddings(51); m.config.pad_token_id = 50; n, pad = 51, 50
    elif kind == 'llama':
        cfg = T.LlamaConfig(vocab_size=60, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                            num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=False, pad_token_id=0)
        m = T.LlamaForCausalLM(cfg); n, pad = 60, 0
    elif kind == 'gemma2-softcap':
        cfg = T.Gemma2Config(vocab_size=60, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                             num_key_value_heads=1, head_dim=8, max_position_embeddings=32, pad_token_id=0, final_logit_softcapping=5.)
        m = T.Gemma2ForCausalLM(cfg); n, pad = 60, 0
    return m, n, pad

def family(kind, fused, chunk=5):
    "A float64 learner of model family `kind`, guarded by padguard(fused=...) with chunks of `chunk` tokens"
    if kind in ('awd-tied', 'awd-untied'):
        learn = awd(kind == 'awd-tied', f64=True)
    elif kind == 'nanogpt':
        set_seed(0, reproducible=True)
        learn = quiet(Learner(ids_dls(40, 1, lo=2), NanoGPT(40, 12), loss_func=CrossEntropyLossFlat()))
    else:
        m, n, pad = hf_lm(kind)
        set_seed(0, reproducible=True)
        learn = quiet(Learner(ids_dls(n, pad, lo=1 if pad == 0 else 3), m, loss_func=CrossEntropyLossFlat(), cbs=HFLogits()))
    if not kind.startswith('awd'): learn.model.double(); learn.add_cb(Float64Recorder())
    return learn.padguard(fused=fused, chunk=chunk, pad_idx=1 if kind == 'nanogpt' else None)

FAMILIES = ['awd-tied', 'awd-untied', 'nanogpt', 'gpt2-tied', 'gpt2-untied', 'llama', 'gemma2-softcap']

@pytest.mark.parametrize('kind', FAMILIES)
def test_family_training_step_equals_unfused(kind):
    "One float64 training step: the loss and every gradient equal the unfused path's (itself checked against the reference)"
    a, b = family(kind, True), family(kind, False)
    assert 'fused: on' in repr(a.pad_guard), repr(a.pad_guard)
    sa, sb = first_step(a), first_step(b)
    assert FusedLogits in sa.preds and FusedLogits not in sb.preds, "control: the fused path ran in one, not the other"
    assert rel_err(sa.loss, sb.loss) <= 1e-10
    assert sa.grads.keys() == sb.grads.keys()
    for k in sb.grads: assert rel_err(sa.grads[k], sb.grads[k]) <= 1e-11, k
    assert not a.fused_output.logits_computed
    assert all('forward' not in m.__dict__ for m in a.model.modules()), "the layer's own forward is back after the fit"

@pytest.mark.parametrize('kind', ['awd-tied', 'gpt2-untied'])
def test_rows_stay_guarded_through_fused_training(kind):
    learn = family(kind, True)
    learn.fit(1, 1e-2, wd=0.1)
    for t in learn.pad_guard.resolve().targets:
        assert torch.equal(t.param.detach()[list(t.rows)], torch.zeros_like(t.param.detach()[list(t.rows)])), t.names

def test_validation_get_preds_predict_and_metrics_equal_unfused():
    "Same data, same init, float64: valid loss, accuracy, perplexity, get_preds and predict agree with the unfused learner"
    res = []
    for fused in (True, False):
        learn = awd(f64=True, metrics=[accuracy, Perplexity()])
        learn.padguard(fused=fused, chunk=7)
        learn.fit(1, 1e-2)
        preds, targs = learn.get_preds(reorder=False)  # fastai's LMLearner.get_preds can't reorder an LM loader's batches
        res.append((learn.recorder.values[-1], preds, (set_seed(1), learn.predict('ACD', n_words=3, temperature=0.01))[1], learn))
    (va, pa, ta, la), (vb, pb, tb, lb) = res
    assert all(abs(x - y) <= 1e-9 * max(1, abs(y)) for x, y in zip(va, vb)), (va, vb)
    assert rel_err(pa, pb) <= 1e-9 and ta == tb

def test_show_results_equal_unfused(monkeypatch):
    "show_results (its own predictions on a batch, decoded to text) shows the same rows fused and unfused"
    import fastai.text.learner as text_learner
    shown = []
    monkeypatch.setattr(text_learner, 'display_df', shown.append)
    for fused in (True, False):
        learn = awd(f64=True)
        learn.padguard(fused=fused, chunk=7)
        learn.fit(1, 1e-2)
        learn.show_results(max_n=3)
    assert len(shown) == 2 and len(shown[0]) == 3 and list(shown[0].columns) == ['input', 'target', 'pred']
    assert shown[0].equals(shown[1]), (shown[0], shown[1])

def mean_top_prob(inp, targ):
    "A metric that needs the whole logits (a softmax over the vocab), not a per-token reduction"
    return inp.softmax(-1).max(-1)[0].mean()

def test_train_metrics_get_the_logits():
    "train_metrics=True: accuracy computes its argmax chunk by chunk; a metric that reads the whole logits gets them computed, and the guard says so"
    for metric, computed in [(accuracy, False), (mean_top_prob, True)]:
        learn = awd(f64=True, metrics=metric)
        learn.padguard(chunk=7)
        learn.recorder.train_metrics = True
        learn.fit(1, 1e-2)
        vals = learn.recorder.values[-1]
        assert 0 <= vals[1] <= 1
        assert learn.fused_output.logits_computed == computed
        assert ('something read the training logits' in repr(learn.pad_guard)) == computed

class PredReader(Callback):
    "Reads `learn.pred` of each training batch at `event` (after the optimizer's step): the loss it gives, and the logits"
    order = 99
    def __init__(self, event): self.event, self.losses, self.logits = event, [], []
    def _read(self):
        if not self.training: return
        x = self.pred[:]  # any op but the loss computes the logits
        self.losses.append((self.learn.loss_func(x, *self.yb).item(), self.learn.loss.item()))
        self.logits.append(x.detach().clone())
    def after_step(self):
        if self.event == 'after_step': self._read()
    def after_batch(self):
        if self.event == 'after_batch': self._read()

@pytest.mark.parametrize('event', ['after_step', 'after_batch'])
def test_pred_read_after_the_step_is_what_the_loss_saw(event):
    "learn.pred read after the optimizer's step: the loss of it is learn.loss, and its logits equal the unfused learner's"
    out = []
    for fused in (True, False):
        learn = awd(f64=True)
        learn.padguard(fused=fused, chunk=7)
        r = PredReader(event)
        learn.fit(1, 1e-2, cbs=r)
        out.append(r)
    a, b = out
    assert all(abs(l - ref) <= 1e-12 * abs(ref) for l, ref in a.losses), a.losses[:3]
    assert len(a.logits) == len(b.logits) > 10
    for x, y in zip(a.logits, b.logits): assert rel_err(x, y) <= 1e-9

def test_train_metrics_equal_unfused():
    "Recorder(train_metrics=True) reads learn.pred in after_batch, after the step: the same accuracy as fused=False"
    vals = []
    for fused in (True, False):
        learn = awd(f64=True, metrics=accuracy)
        learn.padguard(fused=fused, chunk=7)
        learn.recorder.train_metrics = True
        learn.fit(1, 1e-2)
        vals.append(learn.recorder.values[-1])
    assert all(abs(x - y) <= 1e-9 * max(1, abs(y)) for x, y in zip(*vals)), vals

def test_fastai_callbacks_with_the_fused_path():
    "RNNRegularizer (on by default), GradientAccumulation (a loss scaled before backward) and GradientClip: as unfused"
    out = []
    for fused in (True, False):
        learn = awd(f64=True)
        learn.padguard(fused=fused, chunk=7)
        learn.add_cbs([GradientAccumulation(32), GradientClip(0.1)])
        out.append(first_step(learn, n=2))
    a, b = out
    assert FusedLogits in a.preds
    for k in b.grads: assert rel_err(a.grads[k], b.grads[k]) <= 1e-11, k

def test_when_it_is_off_the_guard_says_why(lm):
    "A plain loss, fused=False, a compiled model: the logits are computed as usual and learn.pad_guard says why"
    learn = lm().padguard(loss=False)
    assert "fused: off: the loss is CrossEntropyLossFlat" in repr(learn.pad_guard)
    assert "fused: off (fused=False)" in repr(lm().padguard(fused=False).pad_guard)
    learn = lm(); learn.model.compile()
    assert "fused: off: the model is compiled" in repr(learn.padguard().pad_guard)
    with pytest.raises(ValueError, match='chunk='): lm().padguard(chunk=0)

def test_export_and_interrupt(lm, tmp_path):
    "After a fused fit the model pickles as fastai's own; an interrupt mid-batch leaves no fused forward behind for what follows"
    learn = lm().padguard(chunk=7)
    learn.fit(1, 1e-2)
    learn.export(tmp_path/'m.pkl')
    l2 = load_learner(tmp_path/'m.pkl')
    assert 'forward' not in l2.model[1].decoder.__dict__
    l2.predict('ACD', n_words=2)
    class Stop(Callback):
        "A Ctrl-C after the fused forward, before the loss, of the second training batch (the first is where the rows are found)"
        def after_pred(self):
            if self.training and self.iter == 1 and isinstance(self.pred, FusedLogits): raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt): learn.fit(1, 1e-2, cbs=Stop())
    assert learn.iter == 1 and 'forward' not in learn.model[1].decoder.__dict__ and '_do_one_batch' not in learn.__dict__
    learn.model.train()
    assert not isinstance(learn.model(learn.dls.one_batch()[0])[0], FusedLogits), "a forward with grad after the interrupt"
    learn.model.reset()
    learn.get_preds(reorder=False)
    learn.export(tmp_path/'m2.pkl')
    learn.fit(1, 1e-2)
    assert 'forward' not in learn.model[1].decoder.__dict__

def test_no_host_sync_in_a_fused_step(lm):
    "The fused training step (forward, chunks, backward) runs no op that syncs with the device"
    learn = lm().padguard(chunk=7)
    rec = RecordOps()
    class Rec(Callback):
        order, n = 99, 0  # after fastai's own before_batch work (CastToTensor), which is not the step's
        def before_batch(self):  # the second training batch: the first one also finds the rows, once per fit
            if self.training: self.n += 1
            if self.training and self.n == 2: rec.__enter__()
        def after_step(self):
            if self.n == 2: rec.__exit__(None, None, None); raise CancelFitException()
    learn.fit(1, 1e-2, cbs=Rec())
    assert {'mm', 'addmm'} <= set(rec.ops) and {'log_softmax', '_log_softmax'} & set(rec.ops), sorted(set(rec.ops))
    assert not SYNC_OPS & set(rec.ops), SYNC_OPS & set(rec.ops)

def test_chunk_rows():
    "At most 64 MiB of float32 logits and 2 * dim tokens, at least dim // 2 tokens, equal chunks"
    assert chunk_rows(1152, 60000, 400) == 231 and chunk_rows(1152, 250000, 400) == 192 and chunk_rows(1152, 250000) == 64
    assert chunk_rows(1152, 60000, 32) == 64 and chunk_rows(2304, 60000, 64) == 128 and chunk_rows(1152, 60000, 128) == 231
    assert chunk_rows(1152, 250000, 32) == 64  # the budget (67 tokens) under the ceiling (64)
    assert chunk_rows(10, 5) == 10 and chunk_rows(2304, 60000, budget=2**30) == 2304

def test_the_fused_forward_is_only_for_the_loss(lm):
    "After the loss of a training batch (a callback running the model again in after_step) the layer gives real logits"
    learn = lm().padguard(chunk=7)
    seen = []
    class Again(Callback):
        def after_step(self):
            if self.training: seen.append(type(self.learn.model(*self.xb)[0])); raise CancelFitException()
    learn.fit(1, 1e-2, cbs=Again())
    assert seen == [Tensor]

# ---- CUDA (run where a GPU is lent: bash bench/cuda_checks.sh; skipped cleanly elsewhere) ----
from conftest import cuda

@cuda
@pytest.mark.parametrize('prec', ['fp16', 'bf16'])
def test_cuda_mixed_precision_fused_equals_unfused(prec):
    "to_fp16/to_bf16 on CUDA: the fused step's loss and gradients within half-precision rounding of the unfused step's"
    out = []
    for fused in (True, False):
        set_seed(0, reproducible=True)
        dls = protein_lm_dls(n=300, bs=16, seq_len=16, device='cuda')
        learn = quiet(language_model_learner(dls, AWD_LSTM, config=small_lm_config(), pretrained=False)).padguard(fused=fused, chunk=7)
        learn = learn.to_fp16() if prec == 'fp16' else learn.to_bf16()
        out.append(first_step(learn))
    a, b = out
    assert FusedLogits in a.preds and FusedLogits not in b.preds
    assert rel_err(a.loss, b.loss) <= 1e-2
    for k in b.grads: assert rel_err(a.grads[k], b.grads[k]) <= 5e-2, k

@cuda
def test_cuda_fused_no_sync():
    "Fused training steps (forward, chunks, backward, guard, optimizer) under torch.cuda.set_sync_debug_mode('error')"
    dls = protein_lm_dls(n=300, bs=16, seq_len=16, device='cuda')
    learn = quiet(language_model_learner(dls, AWD_LSTM, config=small_lm_config(), pretrained=False)).padguard(chunk=7)
    class Strict(Callback):
        order, n = -100, 0
        def before_batch(self):  # from the second training batch on: the first one finds the rows, once per fit
            if self.training: self.n += 1
            if self.training and self.n >= 2: torch.cuda.set_sync_debug_mode('error')
        def after_step(self): torch.cuda.set_sync_debug_mode(0)
    strict = Strict()
    try: learn.fit(1, 1e-3, cbs=strict)
    finally: torch.cuda.set_sync_debug_mode(0)
    assert strict.n > 2

def test_the_weights_are_copied_only_for_a_reader_after_the_step():
    "No callback reads learn.pred after the step: no copy of the output layer's weight; one that may: a copy per step"
    learn = awd(f64=True); learn.padguard(chunk=7)
    learn.fit(1, 1e-2)
    assert learn.fused_output.copy is False and learn.fused_output.copies == 0
    learn.fit(1, 1e-2, cbs=PredReader('after_batch'))
    assert learn.fused_output.copy is True and learn.fused_output.copies > 10
    learn = awd(f64=True, metrics=accuracy); learn.padguard(chunk=7); learn.recorder.train_metrics = True
    learn.fit(1, 1e-2)
    assert learn.fused_output.copy is True

def test_logits_read_late_without_a_copy_refuse():
    "A callback that says it reads no learn.pred after the step, and does: an error naming the fix, never the post-step logits"
    class Liar(Callback):
        pred_after_step = False
        def after_step(self):
            if self.training: self.learn.pred.softmax(-1)
    learn = awd(f64=True); learn.padguard(chunk=7)
    with pytest.raises(RuntimeError, match=r'fused=False'): learn.fit(1, 1e-2, cbs=Liar())
