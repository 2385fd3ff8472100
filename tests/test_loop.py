"A plain PyTorch loop guarded by `fastai_padguard.loop.padguard`: tiny random-init models of each family, float64, AdamW with weight decay"
import pytest, torch
import torch.nn.functional as F
from fastai_padguard.loop import padguard, LoopGuard
from conftest import loop_model

KINDS = ['custom', 'gpt2', 'llama', 'bert-mlm']

def scored(model, batch, causal):
    "`(logits, targets)` flattened, as the loss scores them: next-token targets for a causal LM"
    if isinstance(batch, dict):
        logits, t = model(**{k: v for k, v in batch.items() if k != 'labels'}).logits, batch['labels']
    else: logits, t = model(batch), batch
    if causal: logits, t = logits[:, :-1], t[:, 1:]
    return logits.flatten(0, 1), t.flatten()

def micro(batch, i):
    "Half `i` of the batch: two micro-batches per step (gradient accumulation)"
    return {k: v[2*i:2*i+2] for k, v in batch.items()} if isinstance(batch, dict) else batch[2*i:2*i+2]

@pytest.mark.parametrize('kind', KINDS)
def test_plain_loop_keeps_pad_rows_through_adamw(kind):
    "AdamW with wd, 2 micro-batches a step, clipping: the guarded gradient rows 0 when backward ends, the rows bitwise 0 after each step"
    model, batch, pad, causal = loop_model(kind)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    guard = padguard(model, opt, batch, pad_idx=0 if kind == 'custom' else None)
    assert isinstance(guard, LoopGuard) and all(rows == (pad,) for rows in guard.rows.values())
    want = {'custom': 1, 'gpt2': 1, 'llama': 2, 'bert-mlm': 2}[kind]  # tied tables count once; BERT's decoder bias
    assert len(guard.resolution.targets) == want, guard
    for t in guard.resolution.targets:
        assert t.param.detach().index_select(t.dim, torch.tensor(t.rows)).eq(0).all(), f"{t.names}: 0 before the first forward"
    loss_func = guard.loss_func()
    for step in range(4):
        for i in range(2):
            loss_func(*scored(model, micro(batch, i), causal)).backward()
            for t in guard.resolution.targets:
                assert t.param.grad.index_select(t.dim, torch.tensor(t.rows)).eq(0).all(), f"{t.names}: gradient rows 0 before clipping"
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
        assert norm > 1e-3, "the clip scaled the gradients"
        opt.step(); opt.zero_grad()
        for t in guard.resolution.targets:
            assert t.param.detach().index_select(t.dim, torch.tensor(t.rows)).eq(0).all(), f"{t.names}: rows 0 after step {step}"
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert len(moved) == len(before), "everything else trained"

def test_freeze_mode_holds_rows_through_weight_decay():
    "mode='freeze': AdamW's decoupled weight decay moves rows even without gradient; the write-back inside the step keeps them bitwise"
    model, batch, pad, causal = loop_model('llama')
    w0, h0 = model.model.embed_tokens.weight[pad].detach().clone(), model.lm_head.weight[pad].detach().clone()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.5)
    guard = padguard(model, opt, batch, mode='freeze')
    for _ in range(3):
        guard.loss_func()(*scored(model, batch, causal)).backward(); opt.step(); opt.zero_grad()
    assert torch.equal(model.model.embed_tokens.weight[pad], w0) and torch.equal(model.lm_head.weight[pad], h0)
    guard.remove()
    assert 'step' not in opt.__dict__, "the optimizer's own step back"
    guard.loss_func()(*scored(model, batch, causal)).backward(); opt.step()
    assert not torch.equal(model.lm_head.weight[pad], h0), "unguarded, weight decay moves it"

@pytest.mark.parametrize('kind', KINDS)
def test_loss_is_float64_cross_entropy_over_kept_columns_with_smoothing(kind):
    "guard.loss_func(label_smoothing=0.1): the pad column out of the softmax, the targets and the smoothing; a float64 reference"
    model, batch, pad, causal = loop_model(kind)
    guard = padguard(model, torch.optim.SGD(model.parameters(), lr=0.1), batch, pad_idx=0 if kind == 'custom' else None)
    logits, t = scored(model, batch, causal)
    got = guard.loss_func(label_smoothing=0.1)(logits, t)
    keep = [c for c in range(logits.shape[1]) if c not in guard.resolution.loss_rows]
    lsm = torch.log_softmax(logits.detach()[:, keep], 1)
    ok = (t != -100) & (t != pad)
    nll = -lsm[ok].gather(1, torch.tensor([keep.index(c) for c in t[ok].tolist()])[:, None]).squeeze(1)
    want = (0.9 * nll + 0.1 * -lsm[ok].mean(1)).mean()
    assert got.dtype == torch.float64 and abs(got.item() - want.item()) < 1e-12 * want.item()

def test_refusals_leave_the_optimizer_as_it_was():
    "A second guard on one optimizer, an object that is no optimizer, a batch the model can't take: refused, saying what to pass"
    model, batch, pad, causal = loop_model('gpt2')
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(TypeError, match='pass the optimizer'): padguard(model, model, batch)
    with pytest.raises(TypeError, match='a mapping of its keyword inputs'): padguard(model, opt, 3)
    assert 'step' not in opt.__dict__
    guard = padguard(model, opt, batch)
    with pytest.raises(ValueError, match='guarded already'): padguard(model, opt, batch)
    guard.remove()
    with pytest.raises(ValueError, match='No output layer'):  # a classifier: no columns to leave out
        import transformers as T
        clf = T.GPT2ForSequenceClassification(T.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2, pad_token_id=0, num_labels=3))
        padguard(clf, torch.optim.SGD(clf.parameters(), lr=0.1), {k: v for k, v in batch.items() if k != 'labels'}).loss_func()

def test_first_batch_leaves_the_rngs_and_the_loader_as_they_were():
    "A masking collator draws from torch's RNG: first_batch puts every RNG back and draws no sampler, so training sees what it would"
    import random, numpy as np
    from fastai_padguard.loop import first_batch
    def masking(items):  # as a masked-LM collator: torch's RNG picks the positions, python's and numpy's draw too
        ids = torch.stack(items); random.random(); np.random.rand()
        return {'input_ids': ids, 'labels': ids.masked_fill(torch.rand(ids.shape) > 0.5, -100)}
    dl = torch.utils.data.DataLoader(list(torch.randint(3, 40, (6, 10))), batch_size=2, shuffle=True, collate_fn=masking)
    torch.manual_seed(3); random.seed(3); np.random.seed(3)
    want = torch.rand(1), random.random(), np.random.rand()
    torch.manual_seed(3); random.seed(3); np.random.seed(3)
    b = first_batch(dl, 3)
    assert b['input_ids'].shape == (3, 10) and (b['labels'] != -100).any(), "masked by the collator"
    assert (torch.rand(1), random.random(), np.random.rand()) == want, "every RNG as it was"

@pytest.mark.slow
def test_ddp_two_processes_equal_one_process():
    "DDP on 2 processes (gloo), the model's own loss (pad column in its softmax), clip 1e-2: gradient rows 0 after the all-reduce, before the clip; weights as one process's"
    import tempfile
    from conftest import two_processes
    with tempfile.TemporaryDirectory() as out: r0, r1 = two_processes('loop_ddp.py', out, 'loop')
    for r in (r0, r1):
        assert all(g.eq(0).all() for s in r['grad_rows'] for g in s), "the guarded gradient rows 0 when backward (and DDP's all-reduce) ended"
        assert all(w.eq(0).all() for s in r['rows'] for w in s), "the rows 0 after every step"
        assert r['plain'] is None and 'find_unused_parameters=True' in r['walks'], "a fused pass under DDP only if it walks no graph"
    assert all(torch.equal(v, r1['state'][k]) for k, v in r0['state'].items()), "ranks hold identical weights"
    # one process, the two halves' losses averaged (what DDP's gradient averaging computes), from rank 0's weights
    model, batch, _, _ = loop_model('gpt2')
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters(): p.add_(torch.randn_like(p) * 0.01)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    padguard(model, opt, batch)
    norms = []
    for _ in range(4):
        (sum(model(**{k: v[2*i:2*i+2] for k, v in batch.items()}).loss for i in (0, 1)) / 2).backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-2)); opt.step(); opt.zero_grad()
    assert torch.allclose(torch.stack(norms), r0['norms'], rtol=1e-12, atol=0), "the clip norm left the pad rows out on both"
    for k, v in model.state_dict().items():
        assert (v - r0['state'][k]).abs().max() <= 1e-12 * v.abs().max(), k

def head_input(model, guard, batch):
    "What the output layer takes (the hidden states a user computes the fused loss from), caught by a hook on it"
    seen = []
    h = guard.resolution.head.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    try: model(**{k: v for k, v in batch.items() if k != 'labels'}) if isinstance(batch, dict) else model(batch)
    finally: h.remove()
    return seen[0]

@pytest.mark.parametrize('kind', KINDS)
def test_fused_loss_from_hidden_states_equals_the_loss_over_logits(kind):
    "guard.fused_loss(hidden, targets): the loss and every gradient as loss_func over the logits (float64), the logits never held whole"
    from conftest import LargestOutput
    model, batch, pad, causal = loop_model(kind)
    guard = padguard(model, None, batch, pad_idx=0 if kind == 'custom' else None)
    t = (batch['labels'] if isinstance(batch, dict) else batch)
    for red in ('mean', 'sum', 'none'):
        grads = []
        for fused in (False, True):
            model.zero_grad()
            h = head_input(model, guard, batch)
            ht, tt = (h[:, :-1], t[:, 1:]) if causal else (h, t)
            if fused:
                with LargestOutput() as big: loss = guard.fused_loss(ht, tt, label_smoothing=0.1, reduction=red, chunk=8)
                assert big.numel < tt.numel() * 40, "no op wrote the whole (tokens, vocab) logits"
            else: loss = guard.loss_func(0.1, reduction=red)(guard.resolution.head(ht).flatten(0, 1), tt.flatten())
            loss.sum().backward()
            grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
        (l0, g0), (l1, g1) = grads
        assert l1.dtype == torch.float64 and ((l1 - l0).abs().max() <= 1e-12 * l0.abs().max()), red
        assert g0.keys() == g1.keys()
        for n in g0: assert (g1[n] - g0[n]).abs().max() <= 1e-12 * g0[n].abs().max().clamp_min(1e-300), (red, n)
    guard.remove()

def test_fused_loss_refuses_a_transform_after_the_head():
    "A soft-cap between the output layer and the logits: the hidden states can't give that loss, so fused_loss says so"
    from conftest import NanoGPT
    class Capped(NanoGPT):
        def forward(self, x): return 30 * torch.tanh(super().forward(x) / 30)
    torch.manual_seed(0)
    model, x = Capped(40, 10).double(), torch.randint(1, 40, (2, 10))
    guard = padguard(model, None, x, pad_idx=0)
    assert guard.resolution.transformed
    with pytest.raises(ValueError, match='transform of the output layer'): guard.fused_loss(torch.zeros(2, 10, 16, dtype=torch.float64), x)
    guard.remove()

def test_row_audit_reads_and_init_writes_rows_where_they_train():
    "Llama (untied), 2 rows added as zeros: found untrained in both tables and set to the mean; while they train, read and set in their own parameters"
    from fastai_padguard.loop import row_audit, init_untrained_rows, train_rows
    model, batch, pad, causal = loop_model('llama')
    model.resize_token_embeddings(42)
    tables = {'model.embed_tokens.weight': model.model.embed_tokens.weight, 'lm_head.weight': model.lm_head.weight}
    with torch.no_grad():
        for w in tables.values(): w[40:] = 0
    audit = row_audit(model, batch, data=[batch])
    assert audit.untrained == {n: [40, 41] for n in tables} and all({40, 41} <= set(audit.unused[n]) for n in tables)
    tr = train_rows(model, [40, 41], batch)
    with pytest.raises(ValueError, match='pass trained='): row_audit(model, batch)
    assert row_audit(model, batch, trained=tr).untrained == {n: [40, 41] for n in tables}
    before = {n: w.detach().clone() for n, w in tables.items()}
    assert init_untrained_rows(row_audit(model, batch, trained=tr), tr) == {n: [40, 41] for n in tables}
    sd = model.state_dict()
    for n, w in before.items():
        assert torch.equal(tables[n], w), f"{n}: the frozen table untouched (the rows live in their own parameter)"
        rest = [i for i in range(42) if i not in (pad, 40, 41)]
        assert torch.allclose(sd[n][40], w[rest].mean(0), rtol=0, atol=1e-15) and torch.equal(sd[n][40], sd[n][41]), n
    assert row_audit(model, batch, trained=tr).untrained == {n: [] for n in tables}, "read where they train: no longer untrained"
