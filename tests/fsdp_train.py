"""fastai learners trained with `learn.fsdp_ctx()` on 2 processes (gloo), and the same steps in one process. Run by
tests/test_distributed.py:
    torchrun --nproc_per_node 2 tests/fsdp_train.py OUT_DIR awd|gpt2 [zero|rows|bf16]
Float64 throughout. Each rank trains on its half of every batch (FSDP2 averages the gradients), the reference on the two
halves together: the losses and the weights agree to rounding, the guarded rows are exactly 0 on every shard.
"""
import sys, os, warnings
import faulthandler; faulthandler.dump_traceback_later(300, exit=True)  # a hang fails with every thread's stack
warnings.filterwarnings('ignore')
from pathlib import Path
import torch, torch.distributed as dist
from fastai.text.all import *
from fastai_padguard.all import *
from fastai_padguard.data import protein_lm_dls, small_lm_config
from fastai_padguard.fsdp import ShardedDL
from fastai_padguard.ops import local, local_rows

out, family, mode = Path(sys.argv[1]), sys.argv[2], (sys.argv[3] if len(sys.argv) > 3 else 'zero')
torch.set_num_threads(1)
STEPS, ROWS = 5, {'awd': [10, 11], 'gpt2': [5, 6]}[family]  # tokens the data holds: their lookups train them too

class HFLogits(Callback):
    def after_pred(self): self.learn.pred = self.pred.logits

def gpt2_dls(pad=0, n=128, seq=12, n_tok=40):
    "Token batches with the same number of pad positions in every sequence (so both halves of a batch count as many targets)"
    g = torch.Generator().manual_seed(0)
    x = torch.randint(3, n_tok-1, (n, seq+1), generator=g); x[:, -3:] = pad  # never the guarded row n_tok-1: it is no target
    ds = [(x[i, :-1], x[i, 1:]) for i in range(n)]
    tfms = [[ItemGetter(0)], [ItemGetter(1)]]  # fastai Datasets: what `export` can empty
    return DataLoaders.from_dsets(Datasets(ds[:96], tfms), Datasets(ds[96:], tfms), bs=8, shuffle=False, device='cpu',
                                  num_workers=0)  # no worker processes forked after gloo's threads started (a rare hang)

def learner():
    set_seed(0, reproducible=True)
    if family == 'awd':
        dls = protein_lm_dls(n=300, bs=8, seq_len=16)
        for dl in dls.loaders:  # whole batches of seq_len: fastai's DistributedDL can't collate an LM loader's short last batch
            dl.bl = dl.bl // dl.seq_len * dl.seq_len
            dl.n_batches, dl.last_len = dl.bl // dl.seq_len, dl.seq_len
            dl.n = dl.n_batches * dl.bs
        dls.train.shuffle = False
        learn = language_model_learner(dls, AWD_LSTM, config=small_lm_config(), pretrained=False, drop_mult=0., wd=0.1)
    else:
        import transformers as T
        cfg = T.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0., embd_pdrop=0., attn_pdrop=0.,
                           pad_token_id=0, tie_word_embeddings=True)
        learn = Learner(gpt2_dls(), T.GPT2LMHeadModel(cfg), loss_func=CrossEntropyLossFlat(), cbs=HFLogits(), wd=0.1)
    learn.model.double()
    if family == 'awd': learn.model.reset()  # its hidden state, made in float32 before
    learn.padguard(extra_idxs='fake' if family == 'awd' else [39])
    if mode == 'rows': learn.train_rows(ROWS)
    learn.add_cb(SmoothF64())
    learn.remove_cbs(learn.cbs.filter(lambda c: isinstance(c, ProgressCallback))); learn.logger = noop
    return learn

class SmoothF64(Callback):
    "fastai's smoothed loss starts as a float32 tensor, which `torch.lerp` won't mix with a float64 loss: keep it in the loss's dtype"
    def after_loss(self): self.learn.recorder.smooth_loss.val = self.learn.recorder.smooth_loss.val.to(self.learn.loss.dtype)

class Halves(ShardedDL):
    "What rank `rank` reads, worked out in this one process"
    def _broadcast(self, t, rank): return t

class Stop(Callback):
    "End training after `STEPS` steps; keep each step's loss"
    order = 99
    def before_fit(self): self.losses, self.n = [], 0
    def after_step(self):
        self.losses.append(self.learn.loss.detach().clone()); self.n += 1
        if self.n == STEPS: raise CancelTrainException()

class Union(Callback):
    "The reference: each batch is both ranks' halves, rank 0's first"
    order = 0
    def __init__(self, batches): self.batches = batches
    def before_batch(self):
        if self.training: self.learn.xb, self.learn.yb = self.batches[self.iter]

def both_halves(learn):
    h = [list(Halves(learn.dls.train, r, 2)) for r in (0, 1)]
    n = learn.dls.n_inp
    return [(tuple(torch.cat([a[i], b[i]]) for i in range(n)), tuple(torch.cat([a[i], b[i]]) for i in range(n, len(a)))) for a,b in zip(*h)]

def full(model): return {n: (p.full_tensor() if hasattr(p, 'full_tensor') else p).detach().clone() for n,p in model.named_parameters()}

# one process: the reference (fastai reads WORLD_SIZE to decide whether to gather)
ws = os.environ.pop('WORLD_SIZE')
ref = learner()
before = full(ref.model)
stop = Stop()
halves = both_halves(ref)
ref.dls.loaders[0] = Halves(ref.dls.train, 0, 2)  # as many batches as a rank reads; Union puts both halves in each
ref.fit(1, 1e-2, cbs=[stop, Union(halves)])
res = {'chosen': ROWS, 'before': before, 'ref_losses': torch.stack(stop.losses), 'ref': full(ref.model), 'ref_valid': ref.validate()[0], 'ref_preds': ref.get_preds(reorder=False) if family == 'gpt2' else None}
os.environ['WORLD_SIZE'] = ws

dist.init_process_group('gloo')
rank = dist.get_rank()
learn = learner()
if rank:  # other weights on rank 1: fsdp_ctx starts every rank from rank 0's, as DDP does
    with torch.no_grad():
        for p in learn.model.parameters(): p.add_(0.5)

class Check(Callback):
    "After every step: the guarded rows of each guarded parameter's local shard are exactly 0 on this rank"
    order = Stop.order - 1  # before Stop ends training at the last step
    def before_fit(self): self.ok = []
    def after_step(self):
        for t in self.learn.pad_guard.resolution.targets:
            r = list(local_rows(t.param, t.dim, t.rows))
            self.ok.append((t.names, len(r), bool(local(t.param.detach()).index_select(t.dim, torch.tensor(r, dtype=torch.long)).eq(0).all())))

with learn.fsdp_ctx(mp='bf16' if mode == 'bf16' else None):
    stop, check = Stop(), Check()
    learn.fit(1, 1e-2, cbs=[stop, check])
    mine = torch.stack(stop.losses)
    if mode == 'rows':  # the rows' parameters sharded with their tables, the optimizer's state only for them
        res['opt_shapes'] = [tuple(v.shape) for s in learn.opt.state_dict()['state'] for v in s.values() if isinstance(v, torch.Tensor)]
        res['sd'] = {k: (v.full_tensor() if hasattr(v, 'full_tensor') else v).detach().clone() for k,v in learn.model.state_dict().items()}
        try: learn.train_rows(None); res['lift_inside'] = None
        except ValueError as e: res['lift_inside'] = str(e)
    both = [torch.zeros_like(mine) for _ in range(2)]; dist.all_gather(both, mine)
    res.update(losses=(both[0] + both[1]) / 2, fsdp=full(learn.model), checks=check.ok, valid=learn.validate()[0],
               preds=learn.get_preds(reorder=False) if family == 'gpt2' else None,  # an LM loader: fastai's DistributedDL can't collate its short last batch
               guard=repr(learn.pad_guard), local_shape=tuple(local(learn.model.get_input_embeddings().weight if family == 'gpt2' else learn.model[0].encoder.weight).shape))
    # a sharded checkpoint: saved, trained past, loaded back
    learn.save('ck')
    saved, opt_saved = full(learn.model), [{k: (v.full_tensor() if hasattr(v, 'full_tensor') else v) for k,v in s.items()} for s in learn.opt.state_dict()['state']]
    learn.fit(1, 1e-2, cbs=Stop())
    moved = not all(torch.equal(a, saved[n]) for n, a in full(learn.model).items())
    learn.load('ck')
    opt_back = [{k: (v.full_tensor() if hasattr(v, 'full_tensor') else v) for k,v in s.items()} for s in learn.opt.state_dict()['state']]
    res.update(moved=moved, restored=all(torch.equal(a, saved[n]) for n, a in full(learn.model).items()),
               opt_restored=len(opt_back) == len(opt_saved) and all(
                   s.keys() == o.keys() and all(torch.equal(s[k], o[k]) if isinstance(s[k], torch.Tensor) else s[k] == o[k] for k in s)
                   for s, o in zip(opt_back, opt_saved)), opt_tensors=sum(isinstance(v, torch.Tensor) for s in opt_saved for v in s.values()))
    learn.export('exp.pkl')
    # an after_pred callback that edits the model's output in place, beside one that edits a copy, from the same weights
    class Edit(Callback):
        order = 99  # after fastai's RNNCallback has picked the logits out of the model's output
        def __init__(self, inplace): self.inplace = inplace
        def after_pred(self):
            if not self.inplace: self.learn.pred = self.learn.pred.clone()
            self.learn.pred[..., 2] = 0.
    learn.load('ck')
    learn.fit(1, 1e-2, cbs=[Edit(False), Stop()])
    copy_run = full(learn.model)
    learn.load('ck')
    try:
        learn.fit(1, 1e-2, cbs=[Edit(True), Stop()])
        res['inplace'] = max(((a - copy_run[n]).abs().max() / copy_run[n].abs().max()).item() for n, a in full(learn.model).items())
    except RuntimeError as e: res['inplace'] = str(e)
    res['inplace_unchanged'] = all(torch.equal(a, saved[n]) for n, a in full(learn.model).items())
    res['opt_in'] = [{k: (v.full_tensor() if hasattr(v, 'full_tensor') else v) for k,v in s.items()} for s in learn.opt.state_dict()['state']]
res['opt_out'] = learn.opt.state_dict()['state']  # carried over on leaving
res['after'] = {n: p.detach().clone() for n,p in learn.model.named_parameters()}
res['after_type'] = type(learn.model).__name__
res['export'] = str((learn.path/'exp.pkl').resolve())
if mode == 'rows':  # the whole model's record of the rows: lifted into the tables
    learn.train_rows(None)
    res['lifted'] = {n: p.detach().clone() for n,p in learn.model.named_parameters()}
torch.save(res, out/f'rank{rank}.pt')
dist.barrier()
dist.destroy_process_group()
