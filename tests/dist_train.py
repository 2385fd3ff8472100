"""Train a guarded tied LM in 2 processes on CPU; each rank saves its embedding. Run by tests/test_distributed.py:
    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 tests/dist_train.py OUT_DIR
"""
import sys, os, warnings
warnings.filterwarnings('ignore')
from pathlib import Path
import torch
from fastai.text.all import *
from fastai.distributed import *
from fastai_padguard.all import *

def _broadcast_cpu(self, t, rank):
    "fastai 2.8.12's DistributedDL._broadcast calls .cuda(); gloo broadcasts CPU tensors"
    t = LongTensor(t); torch.distributed.broadcast(t, rank); return t.tolist()
DistributedDL._broadcast = _broadcast_cpu

out = Path(sys.argv[1])
torch.set_num_threads(1)
set_seed(0, reproducible=True)
dls = protein_lm_dls(n=300, bs=8, seq_len=16)
for dl in dls.loaders:
    # fastai 2.8.12's DistributedDL mixes sequences of different batches, so an LM loader's short last batch can't be
    # collated: trim each stream to whole batches of seq_len
    dl.bl = dl.bl // dl.seq_len * dl.seq_len
    dl.n_batches, dl.last_len = dl.bl // dl.seq_len, dl.seq_len
    dl.n = dl.n_batches * dl.bs
learn = language_model_learner(dls, AWD_LSTM, config=small_lm_config(), pretrained=False, wd=0.1).padguard()
steps = []
class Check(Callback):
    order = 99
    def after_step(self):
        m = getattr(self.learn.model, 'module', self.learn.model)  # DistributedDataParallel wraps it during fit
        w = m[0].encoder.weight
        steps.append(bool(torch.equal(w[1], torch.zeros_like(w[1]))))
with learn.distrib_ctx(cpu=True):
    assert num_distrib() == 2, num_distrib()
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(2, 1e-2, cbs=Check())
rank = rank_distrib()
torch.save({'w': learn.model[0].encoder.weight.detach().clone(), 'b': learn.model[1].decoder.bias.detach().clone(),
            'steps': steps, 'guarded': list(learn.pad_guard.guarded.values())[0]}, out/f'rank{rank}.pt')
