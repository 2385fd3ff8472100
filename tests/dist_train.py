"""Train a guarded tied LM in 2 processes on CPU; each rank saves its embedding. Run by tests/test_distributed.py:
    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 tests/dist_train.py OUT_DIR [zero|freeze]
"""
import sys, os, warnings
import faulthandler; faulthandler.dump_traceback_later(300, exit=True)  # a hang fails with every thread's stack
warnings.filterwarnings('ignore')
from pathlib import Path
import torch
from fastai.text.all import *
from fastai.distributed import *
from fastai_padguard.all import *
from fastai_padguard.data import *

def _broadcast_cpu(self, t, rank):
    "fastai 2.8.12's DistributedDL._broadcast calls .cuda(); gloo broadcasts CPU tensors"
    t = LongTensor(t); torch.distributed.broadcast(t, rank); return t.tolist()
DistributedDL._broadcast = _broadcast_cpu

out, mode = Path(sys.argv[1]), (sys.argv[2] if len(sys.argv) > 2 else 'zero')
torch.set_num_threads(1)
set_seed(0, reproducible=True)
dls = protein_lm_dls(n=300, bs=8, seq_len=16)
for dl in dls.loaders:
    # fastai 2.8.12's DistributedDL mixes sequences of different batches, so an LM loader's short last batch can't be
    # collated: trim each stream to whole batches of seq_len
    dl.bl = dl.bl // dl.seq_len * dl.seq_len
    dl.n_batches, dl.last_len = dl.bl // dl.seq_len, dl.seq_len
    dl.n = dl.n_batches * dl.bs
torch.manual_seed(1 + int(os.environ.get('RANK', 0)))  # different initial weights per rank: DDP must make them agree
learn = language_model_learner(dls, AWD_LSTM, config=small_lm_config(), pretrained=False, wd=0.1).padguard(mode='zero' if mode=='rows' else mode)
if mode == 'rows': learn.train_rows([10, 11])  # only these rows of the table, tied decoder and bias train (tokens that occur as inputs)
steps, preds = [], []
class Check(Callback):
    "After every step: guarded rows exactly 0 (zero) or exactly as at fit start (freeze), on this rank"
    order = 99
    def _w(self):
        m = getattr(self.learn.model, 'module', self.learn.model)  # DistributedDataParallel wraps it during fit
        if mode == 'rows': return torch.cat([m[0].encoder.weight.detach(), m[1].decoder.bias.detach()[:, None].expand(-1, 1)], 1)  # all frozen
        return m[0].encoder.weight.detach()[[1,29,30,31]]
    def before_fit(self):  # after DDP's broadcast
        self.ref = torch.zeros_like(self._w()) if mode=='zero' else self._w().clone()
        if mode == 'rows': self.ref[[1,29,30,31]] = 0  # the guard zeroes the pad and xxfake rows at the first batch
    def after_step(self): steps.append(bool(torch.equal(self._w(), self.ref)))
    def after_loss(self):  # what the loss scored: the fused path's FusedLogits in training (padguard()'s default)
        if self.training: preds.append(type(self.learn.pred).__name__)
with learn.distrib_ctx(cpu=True):
    assert num_distrib() == 2, num_distrib()
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(2, 1e-2, cbs=Check())
rank = rank_distrib()
rows_vals = {n: p.detach().clone() for n,p in learn.model.named_parameters() if 'trained_rows' in n}
torch.save({'w': learn.model[0].encoder.weight.detach().clone(), 'b': learn.model[1].decoder.bias.detach().clone(), 'rows': rows_vals,
            'steps': steps, 'preds': preds, 'guarded': list(learn.pad_guard.guarded.values())[0]}, out/f'rank{rank}.pt')
# tear the process group down before exit: left to interpreter shutdown, gloo's threads sometimes abort the process
# ("terminate called without an active exception") after the work is done
torch.distributed.barrier()
torch.distributed.destroy_process_group()
