"""The guard's rows on FSDP2 shards, torch only: a tied LM, sharded per block with `fully_shard`, 5 AdamW steps with weight
decay, in float64; the same steps in one process. Run by tests/test_distributed.py:
    torchrun --nproc_per_node 2 tests/fsdp_rows.py OUT_DIR [zero|freeze]
"""
import sys, warnings
warnings.filterwarnings('ignore')
from pathlib import Path
import torch, torch.distributed as dist
from torch import nn
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from fastai_padguard.rows import find_guarded
from fastai_padguard.ops import RowKeeper, guard_step, retarget, local, local_rows
from fastai_padguard.fused import fused_head
from fastai_padguard.ce import PadCrossEntropy

V, PAD, FAKE = 13, 1, 12  # 13 rows: 7 on rank 0, 6 on rank 1; the pad on rank 0, the other guarded row on rank 1

class TiedLM(nn.Module):
    def __init__(self, d=6):
        super().__init__()
        self.emb = nn.Embedding(V, d)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(d, d), nn.Tanh()) for _ in range(2)])
        self.head = nn.Linear(d, V); self.head.weight = self.emb.weight
    def forward(self, x):
        h = self.emb(x)
        for b in self.blocks: h = h + b(h)
        return self.head(h)

def run(model, keeper, batches):
    "5 AdamW steps with weight decay: the loss of each, the guard zeroing gradient rows and writing rows back in the step"
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    guard_step(opt, keeper)
    keeper.write_back()
    losses = []
    for x, y in batches:
        loss = F.cross_entropy(model(x).reshape(-1, V), y.reshape(-1), ignore_index=PAD)  # out of place: see the in-place hazard
        loss.backward()
        keeper.zero_grads()
        opt.step(); opt.zero_grad()
        losses.append(loss.detach())
    return torch.stack(losses)

def model_and_rows():
    torch.manual_seed(0)
    m = TiedLM().double()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, V-1, (4, 7), generator=g), torch.randint(0, V-1, (4, 7), generator=g)) for _ in range(5)]
    for x, y in batches: x[:, -2:] = PAD; y[:, -2:] = PAD
    found = find_guarded(m, None, PAD, [FAKE], batch=((batches[0][0],), (batches[0][1],)))
    return m, found, batches

out, mode = Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else 'zero'
torch.set_num_threads(1)
m1, g1, batches = model_and_rows()
before = {n: p.detach().clone() for n, p in m1.named_parameters()}
ref = run(m1, RowKeeper(g1.targets, mode), batches)  # one process: the reference

dist.init_process_group('gloo')
mesh = init_device_mesh('cpu', (2,))
m, g, batches = model_and_rows()  # found on the model as it is, before sharding: the tracer reads its own forward
for b in m.blocks: fully_shard(b, mesh=mesh)
fully_shard(m, mesh=mesh)  # the tied table and head, the root
targets = retarget(g.targets, m)
why = fused_head(m, PadCrossEntropy(PAD), g, None).why  # the head's weight is a sharded DTensor now: no fused pass
losses = run(m, RowKeeper(targets, mode), batches)
full = {n: p.full_tensor() for n, p in m.named_parameters()}
rank = dist.get_rank()
torch.save({'ref_losses': ref, 'losses': losses, 'ref': {n: p.detach() for n, p in m1.named_parameters()}, 'full': full,
            'before': before, 'rows': {t.names: t.rows for t in targets}, 'local_shape': tuple(local(m.emb.weight).shape),
            'fused_why': why, 'local_rows': local_rows(m.emb.weight, 0, (PAD, FAKE)),
            'local_pad_rows': local(m.emb.weight.detach())[list(local_rows(m.emb.weight, 0, (PAD, FAKE)))].clone()}, out/f'rank{rank}.pt')
dist.barrier()
dist.destroy_process_group()
