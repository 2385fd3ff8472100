"""A whole fit without the logits (issue 26): finding the rows, training, validation, `validate()` and
`get_preds(with_loss=True, with_preds=False)` never make a tokens x vocab tensor, with the same answers as the unfused path.
Each test has a control that makes the logits (today's tracer, or `fused=False`) and must fail the same assertion."""
import torch, pytest
import torch.nn.functional as F
from fastai.text.all import *
from fastai_padguard.all import *
from fastai_padguard.data import *
from fastai_padguard import trace
from fastai_padguard.fused import FusedLogits, FusedHead
from conftest import LargestOutput, largest_in_batches, NanoGPT, ids_dls, HFLogits, Float64Recorder, quiet, rel_err

V = 4000  # a vocab large enough that tokens x vocab is the largest tensor a tiny model would make (the LSTM's workspace in training: 204,800)
KINDS = ['awd-tied', 'awd-untied', 'nanogpt', 'gpt2-tied', 'gpt2-untied', 'llama', 'gemma2-softcap', 'bert-mlm']

def model_of(kind):
    "A small random-init LM of family `kind` with a vocab of `V`, its pad index, and the callbacks its learner needs"
    torch.manual_seed(0)
    if kind.startswith('awd'):
        cfg = small_lm_config(16, 32, 1, tie_weights=kind == 'awd-tied')
        return get_language_model(AWD_LSTM, V, config=cfg), 1, [ModelResetter, RNNCallback]
    if kind == 'nanogpt': return NanoGPT(V, 12), 1, []
    T = pytest.importorskip('transformers')
    if kind.startswith('gpt2'):
        m = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=V, n_positions=16, n_embd=16, n_layer=1, n_head=2, pad_token_id=1,
                                           tie_word_embeddings=kind == 'gpt2-tied'))
    elif kind == 'llama':
        m = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                             num_key_value_heads=1, max_position_embeddings=16, pad_token_id=1))
    elif kind == 'gemma2-softcap':
        m = T.Gemma2ForCausalLM(T.Gemma2Config(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                               num_key_value_heads=1, head_dim=8, max_position_embeddings=16, pad_token_id=1,
                                               final_logit_softcapping=5.))
    elif kind == 'bert-mlm':
        m = T.BertForMaskedLM(T.BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                           max_position_embeddings=16, pad_token_id=1))
    return m, 1, [HFLogits()]

def learner_of(kind, fused=True, f64=False, metrics=()):
    "A quiet learner of family `kind` on generated batches of 16 x 12 tokens (BERT: masked tokens), `padguard(fused=...)`"
    m, pad, cbs = model_of(kind)
    set_seed(0, reproducible=True)
    dls = ids_dls(V, pad, mask_id=2 if kind == 'bert-mlm' else None)
    learn = quiet(Learner(dls, m, loss_func=CrossEntropyLossFlat(), cbs=cbs, metrics=list(metrics)))
    if f64: learn.model.double(); learn.add_cb(Float64Recorder())
    if kind.startswith('awd'): learn.model.reset()
    return learn.padguard(pad_idx=pad, fused=fused, chunk=None if not fused else 50)

def tokens_x_vocab(learn): return learn.dls.one_batch()[0].numel() * V

class EagerLogits:
    "Today's tracer: every product computed as it runs (the control for the resolution tests)"
    def __new__(cls, x, w, b): return F.linear(x, w, b)

class EagerFused:
    FusedLogits, FusedHead = EagerLogits, FusedHead

def described(g):
    "What a resolution decides: every target, the loss's columns, the output layer, the notes"
    return [(t.names, t.rows, t.how, t.dim, t.role) for t in g.targets], g.pad_idx, g.loss_rows, g.head, g.notes

@pytest.mark.parametrize('kind', KINDS)
def test_finding_the_rows_makes_no_tokens_x_vocab_tensor(kind, monkeypatch):
    "The resolution from a batch: the largest tensor made is smaller than the logits, and what it finds is what today's tracer finds"
    learn = learner_of(kind)
    b = learn.dls.one_batch()
    with LargestOutput() as rec: g = learn.pad_guard.resolve((b[:1], b[1:]))
    assert 0 < rec.numel < tokens_x_vocab(learn), (rec.numel, tokens_x_vocab(learn))
    monkeypatch.setattr(trace, '_fused', lambda: EagerFused())
    with LargestOutput() as ctl: e = learn.pad_guard.resolve((b[:1], b[1:]))
    assert ctl.numel >= tokens_x_vocab(learn), "control: today's tracer computes the logits"
    assert described(g) == described(e)
    assert g.head is not None and g.loss_rows == (1,)

def test_the_tracer_reads_the_layer_own_forward_while_the_fused_head_is_on():
    "A resolution asked for inside a training batch, while the fused output layer is installed, finds what one outside finds"
    learn = learner_of('awd-tied')
    outside = described(learn.pad_guard.resolve())
    seen = []
    class ResolveInBatch(Callback):
        order, pred_after_step = 50, False
        def after_pred(self):
            on = isinstance(self.learn.model[1].decoder.__dict__.get('forward'), FusedHead)
            if self.training and on and not seen:
                seen.append(None)  # the tracer runs the learner's after_pred callbacks, this one too
                seen[0] = described(self.learn.pad_guard.resolve())
    learn.fit(1, 1e-3, cbs=ResolveInBatch())
    assert seen == [outside]

METRICS = [accuracy, Perplexity(), partial(top_k_accuracy, k=3)]

@pytest.mark.parametrize('kind', ['awd-tied', 'gpt2-untied', 'gemma2-softcap'])
def test_validation_makes_no_tokens_x_vocab_tensor(kind):
    "validate() with accuracy, Perplexity and top_k_accuracy, and get_preds(with_loss=True, with_preds=False): no logits (control: fused=False)"
    for fused in (True, False):
        learn = learner_of(kind, fused=fused, metrics=METRICS)
        with largest_in_batches() as (v, cbs): learn.validate(cbs=cbs)
        with largest_in_batches() as (p, cbs): learn.get_preds(with_loss=True, with_preds=False, reorder=False, cbs=cbs)
        n = tokens_x_vocab(learn)
        if fused: assert v.numel < n and p.numel < n, (v.numel, p.numel, n)
        else: assert v.numel >= n and p.numel >= n, "control: the unfused path computes the logits"
        assert all('forward' not in m.__dict__ for m in learn.model.modules()), "the layer's own forward is back"

def test_a_whole_fit_makes_no_tokens_x_vocab_tensor():
    "fit_one_cycle with validation and metrics (the rows found, training, validation): never the logits (control: fused=False)"
    for fused in (True, False):  # the control is not plain fastai: fastai 2.7's loss can't run under a dispatch mode (torch 2.3)
        learn = learner_of('awd-tied', fused=fused, metrics=METRICS)
        with largest_in_batches() as (rec, cbs): learn.fit_one_cycle(1, 1e-3, cbs=cbs)
        assert (rec.numel < tokens_x_vocab(learn)) == fused, (fused, rec.numel)

@pytest.mark.parametrize('kind', ['awd-tied', 'gpt2-tied', 'gemma2-softcap'])
def test_validation_loss_and_metrics_equal_unfused(kind):
    "float64: a fit's validation loss and metrics, validate() and get_preds' per-item losses equal fused=False's"
    res = []
    for fused in (True, False):
        learn = learner_of(kind, fused=fused, f64=True, metrics=METRICS)
        learn.fit(1, 1e-2)
        rec = learn.recorder.values[-1]
        val = learn.validate()
        _, targs, losses = learn.get_preds(with_loss=True, with_preds=False, reorder=False)
        preds, _ = learn.get_preds(reorder=False)
        res.append((rec, val, losses, preds, learn))
    (ra, va, la, pa, a), (rb, vb, lb, pb, b) = res
    for x, y in zip([*ra, *va], [*rb, *vb]): assert abs(x - y) <= 1e-9 * max(1, abs(y)), (ra, va, rb, vb)
    assert rel_err(la, lb) <= 1e-10 and rel_err(pa, pb) <= 1e-10

def test_per_token_reductions_are_exact_and_chunked():
    "argmax, max and topk over the vocab of FusedLogits: equal to the computed logits', never computing them whole"
    torch.manual_seed(0)
    h = torch.randn(4, 9, 8, dtype=torch.float64); w = torch.randn(300, 8, dtype=torch.float64); b = torch.randn(300, dtype=torch.float64)
    head = FusedHead(nn.Linear(8, 300), chunk=5)
    x = torch.tanh(FusedLogits(h, w, b, head) / 3.) * 3.
    ref = torch.tanh(F.linear(h, w, b) / 3.) * 3.
    with LargestOutput() as rec:
        am, mx, tk = x.argmax(-1), x.max(dim=-1, keepdim=True), x.topk(4, dim=2)
        am2, tk2 = torch.argmax(x, dim=-1, keepdim=True), torch.topk(x, 2)
    assert rec.numel < 4 * 9 * 300 and not head.computed
    assert torch.equal(am, ref.argmax(-1)) and torch.equal(am2, ref.argmax(-1, keepdim=True))
    assert torch.equal(mx.values, ref.max(-1, keepdim=True).values) and torch.equal(mx.indices, ref.max(-1, keepdim=True).indices)
    assert torch.equal(tk.values, ref.topk(4, dim=2).values) and torch.equal(tk.indices, ref.topk(4, dim=2).indices)
    assert torch.equal(tk2.indices, ref.topk(2).indices)
    assert torch.equal(x.argmax(0), ref.argmax(0)) and head.computed, "over another axis: computed whole"

def test_logits_detached_or_moved_stay_lazy_until_read():
    "detach(), cpu(), to(device), clone(): still not computed; read, each equals the logits, without autograd after detach"
    h = torch.randn(5, 4, requires_grad=True); w = torch.randn(7, 4, requires_grad=True)
    x = FusedLogits(h, w, None)
    d, c, t, k = x.detach(), x.cpu(), x.to('cpu'), x.clone()
    assert all(type(y) is FusedLogits and y._real is None for y in (d, c, t, k)) and x._real is None
    assert x.requires_grad and not d.requires_grad
    ref = F.linear(h, w)
    for y in (d, c, t, k): assert torch.equal(y + 0, ref)
    assert not (d + 0).requires_grad and (k + 0).requires_grad
    assert x._real is None, "each derived tensor is computed on its own"

def test_logits_kept_after_validate_stay_what_they_were():
    "learn.pred after validate() (not computed) keeps the weights it was made with: training after it changes nothing it gives"
    learn = learner_of('awd-tied', f64=True)
    learn.validate()
    p = learn.pred
    assert type(p) is FusedLogits and p._real is None
    head = learn.model[1].decoder
    expect = F.linear(p.h, head.weight.detach().clone(), head.bias.detach().clone())
    learn.fit(1, 1e-1)
    assert not torch.equal(head.weight, p.weight), "the fit changed the layer"
    assert torch.equal(p + 0, expect)

def test_get_preds_computes_kept_logits_at_the_end_of_their_batch():
    "get_preds keeps each batch's logits (detached, on the CPU): each becomes a plain tensor of them at the end of its batch, equal to fused=False's"
    learn = learner_of('awd-tied')
    kept = []
    class Peek(Callback):
        order, pred_after_step = 99, False  # after FusedOutput's after_batch
        def before_validate(self): self.gather = next(c for c in self.learn.cbs if isinstance(c, GatherPredsCallback))
        def after_batch(self): kept.append([type(x) for x in self.gather.preds])
    preds, targs = learn.get_preds(ds_idx=0, reorder=False, cbs=Peek())  # the training set: 5 batches
    assert len(kept) == 5 and all(k == [Tensor]*(i+1) for i, k in enumerate(kept)), kept
    assert type(learn.pred) is FusedLogits and learn.pred._real is None, "learn.pred itself stays lazy"
    ref, _ = learner_of('awd-tied', fused=False).get_preds(ds_idx=0, reorder=False)
    assert type(preds) is Tensor and preds.shape == ref.shape and rel_err(preds, ref) <= 1e-6
