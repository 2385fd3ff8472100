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
