"The Hugging Face Trainer with `PadGuardCallback`: tiny random-init GPT-2, Llama and BERT-MLM models, float64, on CPU"
import pytest, torch
T = pytest.importorskip('transformers')
from transformers import TrainerCallback
from fastai_padguard.hf import PadGuardCallback
from conftest import loop_model, trainer_of, items_of

KINDS = ['gpt2', 'llama', 'bert-mlm']

class GradCheck(TrainerCallback):
    "At each optimizer step (after the Trainer's clip): the guarded gradient rows, and the gradients' total norm"
    def __init__(self, guard_cb): self.cb, self.zero, self.norms = guard_cb, [], []
    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        ts = self.cb.guard.resolution.targets
        self.zero.append(all(t.param.grad.index_select(t.dim, torch.tensor(t.rows)).eq(0).all() for t in ts))
        self.norms.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None])).item())

def reference(logits, labels, rows, causal, eps=0.1):
    "Cross-entropy in float64 over the kept columns, label smoothing spread over them, the pad and -100 targets left out"
    if causal: logits, labels = logits[:, :-1], labels[:, 1:]
    logits, labels = logits.flatten(0, 1).double(), labels.flatten()
    keep = [c for c in range(logits.shape[1]) if c not in rows]
    lsm = torch.log_softmax(logits[:, keep], 1)
    ok = (labels != -100) & ~torch.isin(labels, torch.tensor(rows))
    nll = -lsm[ok].gather(1, torch.tensor([keep.index(c) for c in labels[ok].tolist()])[:, None]).squeeze(1)
    return ((1 - eps) * nll + eps * -lsm[ok].mean(1)).mean()

@pytest.mark.parametrize('kind', KINDS)
def test_trainer_keeps_pad_rows_and_scores_kept_columns(kind, tmp_path):
    "AdamW with wd, smoothing, 2 micro-batches a step: rows bitwise 0, gradient rows 0 before the clip, the loss a float64 reference"
    model, batch, pad, causal = loop_model(kind)
    cb = PadGuardCallback()
    check = GradCheck(cb)
    tr = trainer_of(model, items_of(batch), tmp_path, [cb, check], cb.loss, max_grad_norm=1e9)
    tr.train()
    assert len(check.zero) == 4 and all(check.zero), "the guarded gradient rows 0 when the Trainer clipped them"
    logged = [h['grad_norm'] for h in tr.state.log_history if 'grad_norm' in h]
    assert len(logged) == 4 and all(abs(a - b) <= 1e-9 * b for a, b in zip(logged, check.norms)), "the clip norm left them out"
    assert cb.guard is None, "taken off at the end of training"
    g = cb.ce  # the loss stays: evaluate() and compute_loss use it
    targets = [t for t in model.parameters() if t.dim() == 2 and t.shape[0] == 40] + [p for n, p in model.named_parameters() if n.endswith('predictions.bias')]
    for p in targets: assert p.detach()[pad].eq(0).all(), "the pad row exactly 0 after training"
    assert torch.equal(model.get_input_embeddings().weight[pad], torch.zeros(16, dtype=torch.float64))
    # the loss the Trainer computes (its compute_loss: labels popped, the model's forward, compute_loss_func)
    model.eval()
    with torch.no_grad():
        got = tr.compute_loss(model, dict(batch))
        logits = model(**{k: v for k, v in batch.items() if k != 'labels'}).logits
    want = reference(logits, batch['labels'], list(g.rows), causal)
    assert got.dtype == torch.float64 and abs(got.item() - want.item()) <= 1e-12 * want.item()
    cb.setup(model, batch)  # guarded again (train() took the hooks off at its end), to read what it says
    assert "fused: on: in training, 'lm_head'" in repr(cb) or kind == 'bert-mlm' and 'fused: on' in repr(cb)
    assert 'leaves out columns [0]' in repr(cb)
    cb.on_train_end(None, None, None)

class WidestLogits(TrainerCallback):
    "From each step's begin to its end (forward, loss, backward, clip, step): the largest tensor written with the vocab on its last axis"
    def __init__(self, guard_cb, vocab): self.cb, self.vocab, self.numel, self.whole = guard_cb, vocab, [], []
    def on_step_begin(self, args, state, control, **kw):
        from conftest import LargestOutput
        self.rec = LargestOutput(self.vocab); self.rec.__enter__()
    def on_step_end(self, args, state, control, **kw):
        self.rec.__exit__(None, None, None); self.numel.append(self.rec.numel)
        self.whole.append(self.cb.head is not None and self.cb.head.computed)

@pytest.mark.parametrize('kind', KINDS)
def test_trainer_fused_pass_equals_the_unfused_and_never_holds_the_logits(kind, tmp_path):
    "In training the output layer runs inside cb.loss in chunks: the same weights after 4 steps (float64), no (tokens, vocab) tensor"
    runs = {}
    for fused in (False, True):
        model, batch, pad, causal = loop_model(kind)
        cb = PadGuardCallback(fused=fused, chunk=5)
        wide = WidestLogits(cb, 40)
        tr = trainer_of(model, items_of(batch), tmp_path/str(fused), [cb, wide], cb.loss, max_grad_norm=1.0)
        tr.train()
        runs[fused] = dict(model.named_parameters()), [h['loss'] for h in tr.state.log_history if 'loss' in h], wide
    (w0, l0, u), (w1, l1, f) = runs[False], runs[True]
    per_micro_batch = 2 * 10 * 40  # 2 items of 10 tokens, vocab 40
    assert min(u.numel) >= per_micro_batch, "unfused: the logits of a micro-batch are held whole (the test's control)"
    # fused: the widest is weight-sized (dim 16 x vocab 40: the layer's weight transposed), a chunk's logits 5 x 40
    assert len(f.numel) == 4 and max(f.numel) <= 16 * 40 < per_micro_batch, "fused: no micro-batch's logits held whole"
    assert not any(f.whole), "nothing computed the logits whole"
    assert len(l1) == 4 and all(abs(a - b) <= 1e-6 * b for a, b in zip(l1, l0)), "the logged losses (the Trainer logs them in float32)"
    # one step's gradients agree to 1e-15; AdamW's 1/sqrt(v) magnifies rounding where a gradient is near 0 (attention biases).
    # BERT's key bias has no gradient at all (the softmax ignores a shift): it holds rounding only, ~1e-15, so the scale
    # has a floor of the learning rate's size
    for n, p in w0.items(): assert (w1[n] - p).abs().max() <= 1e-10 * max(p.abs().max(), 1e-2), n
    assert w1['lm_head.weight' if kind == 'llama' else next(iter(w1))][pad].eq(0).all()

class HeadsMade(TrainerCallback):
    "At each step's end: how many fused logits the output layer's head still keeps track of"
    def __init__(self, cb): self.cb, self.n = cb, []
    def on_step_end(self, args, state, control, **kw): self.n.append(len(self.cb.head.made))

def test_trainer_fused_head_forgets_the_logits_it_scored(tmp_path):
    "Each step's fused logits are scored before the step: the head drops them then, so what it tracks stays flat over a run"
    model, batch, pad, _ = loop_model('gpt2')
    cb = PadGuardCallback()
    made = HeadsMade(cb)
    trainer_of(model, items_of(batch), tmp_path, [cb, made], cb.loss, max_steps=6).train()
    assert made.n == [0] * 6, made.n

def test_trainer_fused_head_is_for_training_only(tmp_path):
    "evaluate/predict (eval mode or no grad) get the model's logits; in training the head gives logits the loss computes in chunks"
    from fastai_padguard.fused import FusedLogits
    model, batch, pad, _ = loop_model('llama')
    cb = PadGuardCallback()
    cb.setup(model, batch)
    inputs = {k: v for k, v in batch.items() if k != 'labels'}
    model.eval()
    assert type(model(**inputs).logits) is torch.Tensor
    model.train()
    with torch.no_grad(): assert type(model(**inputs).logits) is torch.Tensor
    out = model(**inputs)
    assert isinstance(out.logits, FusedLogits)
    assert 'fused: on' in repr(cb) and 'computed the logits whole' not in repr(cb)
    model(**batch).loss.backward()  # the model's own loss reads them: computed whole (correct), and cb says so
    assert 'computed the logits whole' in repr(cb)
    cb.on_train_end(None, None, None)
    assert type(model(**inputs).logits) is torch.Tensor and cb.head is None, "the layer's own forward back"
    off = PadGuardCallback(fused=False); off.setup(model, batch)
    assert 'fused: off: fused=False' in repr(off) and type(model(**inputs).logits) is torch.Tensor
    off.on_train_end(None, None, None)

def test_the_trainers_item_count_divides_in_the_losss_dtype():
    "num_items_in_batch comes as an int64 tensor: a float64 loss divides by it in float64 (a float32 1/17 is off by 4e-9), fused or not"
    for fused in (False, True):
        model, batch, pad, causal = loop_model('gpt2')
        cb = PadGuardCallback(fused=fused); cb.setup(model, batch, 0.1)
        out = model(**{k: v for k, v in batch.items() if k != 'labels'})
        labels = torch.nn.functional.pad(batch['labels'], (0, 1), value=-100)[..., 1:]
        want = cb.guard.loss_func(0.1, reduction='sum')(model(**{k: v for k, v in batch.items() if k != 'labels'}).logits.flatten(0, 1), labels.flatten()) / 17.
        cb.on_train_end(None, None, None)
        got = cb.loss(out, batch['labels'], torch.tensor(17))
        assert got.dtype == torch.float64 and abs(got.item() - want.item()) <= 1e-15 * want.item(), fused

def test_a_step_with_no_target_gives_0_not_nan_fused_or_not():
    "num_items_in_batch 0 (every label -100 in a whole step): the loss and the gradients 0, as the unfused loss gives; fused, 0/0 was NaN"
    for fused in (False, True):
        model, batch, pad, causal = loop_model('gpt2')
        cb = PadGuardCallback(fused=fused); cb.setup(model, batch)
        loss = cb.loss(model(**{k: v for k, v in batch.items() if k != 'labels'}), torch.full_like(batch['labels'], -100), torch.tensor(0))
        loss.backward()
        assert loss.item() == 0 and all(p.grad is None or p.grad.eq(0).all() for p in model.parameters()), fused
        cb.on_train_end(None, None, None)

class StopAt(TrainerCallback):
    "End training after step `n` (the checkpoint of that step is written first)"
    def __init__(self, n): self.n = n
    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.n: control.should_training_stop = True

def test_trainer_resume_from_checkpoint_is_bitwise(tmp_path):
    "4 steps straight, against 2 steps, a checkpoint, and a new Trainer resuming from it for 2 more: every weight bitwise"
    from packaging.version import Version
    if Version(torch.__version__.split('+')[0]) < Version('2.6'): pytest.skip("transformers loads a checkpoint's optimizer state with torch >= 2.6 only")
    def run(out, **kw):
        model, batch, _, _ = loop_model('gpt2')
        cb = PadGuardCallback()
        tr = trainer_of(model, items_of(batch), out, [cb], cb.loss, **kw)
        return tr, model
    tr, straight = run(tmp_path/'a'); tr.train()
    tr, _ = run(tmp_path/'b', save_strategy='steps', save_steps=2); tr.add_callback(StopAt(2)); tr.train()  # the same schedule
    tr, resumed = run(tmp_path/'b'); tr.train(resume_from_checkpoint=str(tmp_path/'b'/'checkpoint-2'))
    for (n, p), q in zip(straight.named_parameters(), resumed.parameters()): assert torch.equal(p, q), n
    assert resumed.transformer.wte.weight[0].eq(0).all()

def test_trainer_freeze_mode_holds_rows_through_weight_decay(tmp_path):
    "mode='freeze' with AdamW's weight decay 0.5: the pad rows of Llama's untied table and head bitwise as they were"
    model, batch, pad, _ = loop_model('llama')
    w0, h0 = model.model.embed_tokens.weight[pad].detach().clone(), model.lm_head.weight[pad].detach().clone()
    cb = PadGuardCallback(mode='freeze')
    trainer_of(model, items_of(batch), tmp_path, [cb], cb.loss, weight_decay=0.5).train()
    assert torch.equal(model.model.embed_tokens.weight[pad], w0) and torch.equal(model.lm_head.weight[pad], h0)
    assert not torch.equal(model.lm_head.weight[pad + 1], torch.zeros_like(h0))

def test_an_optimizer_that_writes_nothing_back_is_refused(tmp_path):
    "A Trainer whose optimizer is no torch optimizer: the first step ends in an error, not in rows that moved silently"
    model, batch, _, _ = loop_model('gpt2')
    class Plain(torch.optim.Optimizer):  # a torch optimizer by class only (as a wrapper can be): its step runs no torch step hook
        def __init__(self, ps): self.param_groups, self.defaults, self.state = [{'params': list(ps), 'lr': 1e-2}], {}, {}
        def step(self, closure=None):
            with torch.no_grad():
                for p in self.param_groups[0]['params']:
                    if p.grad is not None: p.sub_(1e-2 * p.grad)
        def zero_grad(self, set_to_none=True):
            for p in self.param_groups[0]['params']: p.grad = None
        def state_dict(self): return {}
        def load_state_dict(self, sd): pass
    cb = PadGuardCallback()
    tr = trainer_of(model, items_of(batch), tmp_path, [cb], cb.loss)
    tr.optimizer = Plain(model.parameters())
    with pytest.raises(RuntimeError, match='no torch optimizer step ran'): tr.train()

@pytest.mark.parametrize('kind', ['gpt2', 'llama'])
def test_trainer_zeroes_gradient_rows_before_the_clip_with_hfs_own_loss(kind, tmp_path):
    "The guard alone (the model's own loss, the pad column in its softmax): the gradient rows 0 before the Trainer's clip reads them"
    model, batch, pad, _ = loop_model(kind)
    cb = PadGuardCallback()
    check = GradCheck(cb)
    tr = trainer_of(model, items_of(batch), tmp_path, [cb, check], label_smoothing_factor=0., max_grad_norm=1e9)
    tr.train()
    logged = [h['grad_norm'] for h in tr.state.log_history if 'grad_norm' in h]
    assert all(check.zero) and len(logged) == 4 and all(abs(a - b) <= 1e-9 * b for a, b in zip(logged, check.norms))
    assert model.get_input_embeddings().weight[pad].eq(0).all() and model.get_output_embeddings().weight[pad].eq(0).all()

def test_gradient_accumulation_counts_every_micro_batchs_tokens(tmp_path):
    "2 micro-batches of 2 a step equal 1 batch of 4 (float64, to rounding), though the items hold different numbers of targets"
    def run(out, **kw):
        model, batch, _, _ = loop_model('gpt2')
        batch['input_ids'][0, 2:], batch['labels'][0, 2:], batch['attention_mask'][0, 2:] = 0, -100, 0  # item 0: 1 target
        cb = PadGuardCallback()
        trainer_of(model, items_of(batch), out, [cb], cb.loss, **kw).train()
        return dict(model.named_parameters())
    a, b = run(tmp_path/'a'), run(tmp_path/'b', per_device_train_batch_size=4, gradient_accumulation_steps=1)
    for n, p in a.items(): assert (p - b[n]).abs().max() <= 1e-10 * b[n].abs().max(), n

@pytest.mark.parametrize('kind', ['gpt2', 'llama'])
def test_trainer_trains_only_added_rows_and_save_pretrained_holds_them(kind, tmp_path):
    "train_rows(model, [40, 41], batch) before the Trainer: only the added rows move; save_pretrained/from_pretrained hold them"
    from fastai_padguard.loop import train_rows
    model, batch, pad, _ = loop_model(kind)
    model.resize_token_embeddings(42)
    batch['input_ids'][:, 1], batch['input_ids'][:, 3] = 40, 41
    batch['labels'] = batch['input_ids'].masked_fill(batch['input_ids'] == 0, -100)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tables = ['transformer.wte.weight'] if kind == 'gpt2' else ['model.embed_tokens.weight', 'lm_head.weight']
    tr = train_rows(model, [40, 41], batch)
    cb = PadGuardCallback()
    trainer = trainer_of(model, items_of(batch), tmp_path, [cb], cb.loss)
    trainer.train()
    sd = model.state_dict()
    assert not any('trained_rows' in k for k in sd), "the plain model's keys"
    for n in tables:
        assert torch.equal(sd[n][1:40], before[n][1:40]), f"{n}: every row but the added ones bitwise as it was"
        assert not torch.equal(sd[n][40:], before[n][40:]), f"{n}: the added rows trained"
        assert sd[n][pad].eq(0).all(), f"{n}: the pad row 0"
    shapes = {tuple(v.shape) for s in trainer.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim()}
    assert (42, 16) not in shapes and (2, 16) in shapes, "optimizer state for the 2 rows, none the size of the table"
    model.save_pretrained(tmp_path/'saved')
    from packaging.version import Version
    dtype = {'dtype' if Version(T.__version__) >= Version('4.56') else 'torch_dtype': torch.float64}
    loaded = type(model).from_pretrained(tmp_path/'saved', **dtype)
    for n in tables: assert torch.equal(loaded.state_dict()[n], sd[n]), f"{n}: from_pretrained reads the trained rows"
    tr.lift()
    for n in tables: assert torch.equal(model.state_dict()[n], sd[n]), f"{n}: lifted into the table"

@pytest.mark.slow
def test_trainer_ddp_two_processes_equal_one_process(tmp_path):
    "The Trainer under torchrun (accelerate's DDP on CPU, gloo), 2 items a rank, clip 1e-2, fused: rows 0 on both ranks; the weights as one process's batch of 4"
    from conftest import two_processes
    r0, r1 = two_processes('loop_ddp.py', tmp_path, 'trainer')
    for r in (r0, r1):
        assert len(r['grad_rows']) == 4 and all(g.eq(0).all() for s in r['grad_rows'] for g in s), "gradient rows 0 at the step"
        assert all(w.eq(0).all() for s in r['rows'] for w in s), "the rows 0 after every step"
        assert 'fused: on' in r['said'], "with ddp_find_unused_parameters=False the output layer runs inside the loss"
        assert 'fused: off' in r['said_default'] and 'ddp_find_unused_parameters=False' in r['said_default'], "the default: off, saying why"
    assert all(torch.equal(v, r1['state'][k]) for k, v in r0['state'].items()), "ranks hold identical weights"
    model, batch, _, _ = loop_model('gpt2')  # as tests/loop_ddp.py: item 0 holds 1 target, the others 6
    batch['input_ids'][0, 2:], batch['labels'][0, 2:], batch['attention_mask'][0, 2:] = 0, -100, 0
    cb = PadGuardCallback()
    tr = trainer_of(model, items_of(batch), tmp_path/'one', [cb], cb.loss, gradient_accumulation_steps=1, per_device_train_batch_size=4,
                    max_grad_norm=1e-2)
    tr.train()
    norms = lambda log: [h['grad_norm'] for h in log if 'grad_norm' in h]
    assert all(abs(a - b) <= 1e-12 * b for a, b in zip(norms(r0['log']), norms(tr.state.log_history)))
    for k, v in model.state_dict().items():
        assert (v - r0['state'][k]).abs().max() <= 1e-12 * v.abs().max(), k

@pytest.mark.parametrize('how', ['peft-lora', 'bf16'])
def test_trainer_keeps_the_trained_tables_pad_rows_with_peft_and_bf16(how, tmp_path):
    "A PEFT LoRA model whose tables train as PEFT's copies (modules_to_save), and bf16 autocast: the tables that train keep rows 0"
    model, batch, pad, _ = loop_model('llama')
    if how == 'peft-lora':
        peft = pytest.importorskip('peft')
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=['q_proj', 'v_proj'], modules_to_save=['embed_tokens', 'lm_head']))
        kw = {}
    else: model, kw = model.float(), dict(bf16=True)
    cb = PadGuardCallback()
    check = GradCheck(cb)
    tr = trainer_of(model, items_of(batch), tmp_path, [cb, check], cb.loss, **kw)
    tr.train()
    assert len(check.zero) == 4 and all(check.zero)
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad and p.dim() == 2 and p.shape[0] == 40}
    assert len(trained) == 2 and all('modules_to_save' in n for n in trained) == (how == 'peft-lora'), list(trained)
    for n, p in trained.items(): assert p.detach()[pad].eq(0).all(), n
    losses = [h['loss'] for h in tr.state.log_history if 'loss' in h]
    assert len(losses) == 4 and all(l == l and abs(l) < 1e3 for l in losses)

def test_trainer_guards_the_pad_among_pefts_trainable_tokens(tmp_path):
    "PEFT TrainableTokens training the pad with 2 added tokens: its delta's pad row is guarded too, so the merged table's pad row is 0"
    peft = pytest.importorskip('peft')
    model, batch, pad, _ = loop_model('llama')
    model.resize_token_embeddings(42, mean_resizing=False)
    batch['input_ids'][:, 1], batch['input_ids'][:, 3] = 40, 41
    batch['labels'] = batch['input_ids'].masked_fill(batch['input_ids'] == 0, -100)
    with torch.no_grad(): model.model.embed_tokens.weight[pad] = 0.1  # the pad row a trained model comes with (HF's init zeroes it)
    before = model.model.embed_tokens.weight.detach().clone()
    model = peft.get_peft_model(model, peft.TrainableTokensConfig(target_modules=['embed_tokens'], token_indices=[pad, 40, 41]))
    cb = PadGuardCallback()
    trainer_of(model, items_of(batch), tmp_path, [cb], cb.loss).train()
    delta = model.base_model.model.model.embed_tokens.trainable_tokens_delta['default']
    assert delta.shape == (3, 16) and delta.detach()[0].eq(0).all(), "the pad's row of PEFT's delta 0"
    w = model.merge_and_unload().model.embed_tokens.weight
    assert w[pad].eq(0).all(), "the merged table's pad row 0"
    assert torch.equal(w[1:40], before[1:40]) and not torch.equal(w[40:], before[40:]), "only the added rows trained"

def test_deepspeed_is_refused_before_anything_changes():
    "TrainingArguments.deepspeed set: ZeRO's fp32 master copy would write the rows over, so on_train_begin refuses, guarding nothing"
    from types import SimpleNamespace
    model, batch, pad, _ = loop_model('gpt2')
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cb = PadGuardCallback()
    with pytest.raises(RuntimeError, match=r'DeepSpeed ZeRO \(TrainingArguments.deepspeed\).*DDP'):
        cb.on_train_begin(SimpleNamespace(deepspeed='ds_config.json', deepspeed_plugin=None), None, None, model=model, train_dataloader=None)
    assert cb.guard is None and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
