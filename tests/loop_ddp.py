"""A plain loop and the Hugging Face Trainer in 2 processes on CPU (gloo), guarded by fastai_padguard.loop / .hf; each rank
saves what it saw. Run by tests/test_loop.py and tests/test_hf.py:
    torchrun --nproc_per_node 2 tests/loop_ddp.py OUT_DIR [loop|trainer]
"""
import sys, os, warnings
import faulthandler; faulthandler.dump_traceback_later(300, exit=True)  # a hang fails with every thread's stack
warnings.filterwarnings('ignore')
from pathlib import Path
import torch, torch.distributed as dist
sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import loop_model, trainer_of, items_of

out, what = Path(sys.argv[1]), sys.argv[2]
torch.set_num_threads(1)
rank = int(os.environ['RANK'])

def rows_of(guard, of_grad=False):
    "The guarded rows of every target (of its gradient), stacked"
    ts = guard.resolution.targets
    return [(t.param.grad if of_grad else t.param.detach()).index_select(t.dim, torch.tensor(t.rows)).clone() for t in ts]

if what == 'loop':
    from torch.nn.parallel import DistributedDataParallel as DDP
    from fastai_padguard.loop import padguard
    dist.init_process_group('gloo')
    model, batch, pad, _ = loop_model('gpt2', seed=0)
    torch.manual_seed(1 + rank)  # different initial weights per rank: DDP's broadcast makes them agree
    with torch.no_grad():
        for p in model.parameters(): p.add_(torch.randn_like(p) * 0.01)
    ddp = DDP(model)
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-2, weight_decay=0.1)
    guard = padguard(ddp, opt, batch)
    half = {k: v[2*rank:2*rank+2] for k, v in batch.items()}
    grad_rows, rows, norms, losses = [], [], [], []
    for step in range(4):
        loss = ddp(**half).loss  # the model's own loss: the pad column is in its softmax, so the pad rows get gradient
        loss.backward()  # DDP averages the gradients across the ranks
        grad_rows.append(rows_of(guard, of_grad=True))
        norms.append(torch.nn.utils.clip_grad_norm_(ddp.parameters(), 1e-2))
        opt.step(); opt.zero_grad()
        rows.append(rows_of(guard)); losses.append(loss.detach())
    from fastai_padguard.fused import fused_head  # a DDP that walks the graph from the outputs: no fused pass, saying why
    walks = fused_head(DDP(model, find_unused_parameters=True), guard.loss_func(), guard.resolution).why
    torch.save({'grad_rows': grad_rows, 'rows': rows, 'norms': torch.stack(norms), 'losses': torch.stack(losses),
                'state': {k: v.clone() for k, v in model.state_dict().items()}, 'walks': walks,
                'plain': fused_head(ddp, guard.loss_func(), guard.resolution).why}, out/f'rank{rank}.pt')
    dist.barrier(); dist.destroy_process_group()
else:
    from transformers import TrainerCallback
    from fastai_padguard.hf import PadGuardCallback
    model, batch, pad, _ = loop_model('gpt2', seed=0)
    batch['input_ids'][0, 2:], batch['labels'][0, 2:], batch['attention_mask'][0, 2:] = 0, -100, 0  # item 0: 1 target
    class Check(TrainerCallback):
        "At each optimizer step, after the Trainer's all-reduce and clip: the guarded gradient rows; after it, the rows"
        def __init__(self, cb): self.cb, self.grad_rows, self.rows = cb, [], []
        def on_pre_optimizer_step(self, args, state, control, **kw): self.grad_rows.append(rows_of(self.cb.guard, of_grad=True))
        def on_optimizer_step(self, args, state, control, **kw): self.rows.append(rows_of(self.cb.guard))
        def on_step_end(self, args, state, control, **kw): self.said = repr(self.cb)
    # the Trainer's default DDP looks for unused parameters: the fused pass is off, saying why
    m0, _, _, _ = loop_model('gpt2', seed=0)
    cb0 = PadGuardCallback(); check0 = Check(cb0)
    trainer_of(m0, items_of(batch), out/'default', [cb0, check0], cb0.loss, gradient_accumulation_steps=1, max_steps=1).train()
    cb = PadGuardCallback()
    check = Check(cb)
    tr = trainer_of(model, items_of(batch), out/'run', [cb, check], cb.loss, gradient_accumulation_steps=1, max_grad_norm=1e-2,
                    ddp_find_unused_parameters=False)  # the fused pass on
    tr.train()
    assert tr.args.world_size == 2, tr.args.world_size
    torch.save({'grad_rows': check.grad_rows, 'rows': check.rows, 'state': {k: v.clone() for k, v in model.state_dict().items()},
                'log': tr.state.log_history, 'said': check.said, 'said_default': check0.said}, out/f'rank{rank}.pt')
    dist.barrier(); dist.destroy_process_group()
