"""Training across 2 processes: fastai's DDP (`distrib_ctx`) vs FSDP2 (`fsdp_ctx`), a tied AWD-LSTM LM at vocab 60k (issue 24).

    python bench/fsdp.py [--vocab 60000] [--rounds 2] [--json bench/results-fsdp.json]
    python bench/fsdp.py --table bench/results-fsdp.json     # bench/README's markdown table from a saved run

Each variant runs in 2 fresh processes (torchrun; gloo on CPU, NCCL with `--device cuda`), the variants launched in turn,
`--rounds` times. Per rank: the peak memory during the fit (on CPU the peak resident set size, reset through Linux's
`/proc/self/clear_refs` right before `fit`, counted from what was resident before the learner was built; on CUDA the
allocator's `max_memory_allocated`), the bytes this rank holds of the weights, their gradients and the optimizer's state
(counted, exact: what FSDP2 shards), and the median time of the training steps after the first. On CPU the peak resident
size also keeps what the allocator freed but did not hand back (the whole model each rank built before sharding).
"""
import argparse, json, os, platform, statistics, subprocess, sys, tempfile, time, warnings
from pathlib import Path
warnings.filterwarnings('ignore')

VARIANTS = ['DDP, padguard(fused=False)', 'DDP, padguard()', 'FSDP2, padguard()']

def _rss(key):
    for l in Path('/proc/self/status').read_text().splitlines():
        if l.startswith(key): return int(l.split()[1])*1024

def worker(args):
    "One rank of one variant: build, guard, train `--steps` steps, write this rank's figures"
    import torch, torch.distributed as dist
    from fastai.text.all import (DataLoaders, Learner, CrossEntropyLossFlat, AWD_LSTM, awd_lstm_lm_config, get_language_model,
                                 awd_lstm_lm_split, ModelResetter, RNNCallback, RNNRegularizer, ProgressCallback, Callback, noop)
    from fastai.distributed import DistributedDL
    import fastai_padguard.all, fastai_padguard.fsdp
    from fastai_padguard.fsdp import ShardedDL
    torch.set_num_threads(1)
    cuda = args.device == 'cuda'
    if cuda: torch.cuda.set_device(int(os.environ['LOCAL_RANK']))
    dist.init_process_group('nccl' if cuda else 'gloo')
    DistributedDL._broadcast = ShardedDL._broadcast  # fastai's DDP loader broadcasts with .cuda(); on CPU, gloo's way
    dev = torch.device('cuda', torch.cuda.current_device()) if cuda else torch.device('cpu')
    base = torch.cuda.memory_allocated() if cuda else _rss('VmRSS')
    V, g = args.vocab, torch.Generator().manual_seed(0)
    n = 2 * args.bs * (args.steps + 1)
    x = torch.randint(2, V, (n, args.seq_len+1), generator=g)
    ds = [(x[i,:-1], x[i,1:]) for i in range(n)]
    dls = DataLoaders.from_dsets(ds, ds[:2*args.bs], bs=args.bs, device=dev, shuffle=False, drop_last=True)
    cfg = {**awd_lstm_lm_config, 'emb_sz': args.emb, 'n_hid': args.hid, 'n_layers': args.layers}
    torch.manual_seed(0)
    learn = Learner(dls, get_language_model(AWD_LSTM, V, config=cfg).to(dev), loss_func=CrossEntropyLossFlat(),
                    cbs=[ModelResetter, RNNCallback, RNNRegularizer(alpha=2, beta=1)], splitter=awd_lstm_lm_split, wd=0.01)
    learn.remove_cb(ProgressCallback); learn.logger = noop
    learn.padguard(fused=args.variant != VARIANTS[0])
    times = []
    class Steps(Callback):
        order = 99
        def before_batch(self):
            if self.training:
                if cuda: torch.cuda.synchronize()
                self.t = time.perf_counter()
        def after_step(self):
            if cuda: torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t)
        def after_train(self): raise CancelFitException()
    from fastai.callback.core import CancelFitException
    ctx = learn.fsdp_ctx() if args.variant.startswith('FSDP2') else learn.distrib_ctx(cpu=not cuda)
    with ctx:
        if cuda: torch.cuda.reset_peak_memory_stats()
        else: Path('/proc/self/clear_refs').write_text('5')
        learn.fit(1, 1e-3, cbs=Steps())
        peak = (torch.cuda.max_memory_allocated() if cuda else _rss('VmHWM')) - base
        from fastai_padguard.ops import local
        nb = lambda ts: sum(local(t).numel() * t.element_size() for t in ts if isinstance(t, torch.Tensor))
        ps = list(learn.model.parameters())
        state = {'params': nb(ps), 'grads': nb(p.grad for p in ps if p.grad is not None),
                 'optimizer': nb(v for s in learn.opt.state_dict()['state'] for v in s.values())}
    out = {'rank': dist.get_rank(), 'peak_mb': peak / 2**20, 'state_mb': sum(state.values()) / 2**20,
           **{f'{k}_mb': v / 2**20 for k, v in state.items()}, 'step_s': statistics.median(times[1:]), 'steps': len(times)}
    Path(args.out, f"rank{dist.get_rank()}.json").write_text(json.dumps(out))
    dist.barrier(); dist.destroy_process_group()

def launch(variant, args):
    "One variant on 2 fresh processes: each rank's figures"
    import socket
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as d:
        cmd = [str(Path(sys.executable).parent/'torchrun'), '--nproc_per_node', '2', '--master_addr', '127.0.0.1', '--master_port', str(port),
               __file__, '--worker', '--variant', variant, '--out', d, *sys.argv[1:]]
        env = {**os.environ, 'OMP_NUM_THREADS': '1', 'ACCELERATE_USE_CPU': '0' if args.device == 'cuda' else '1'}
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode: raise RuntimeError(f"{variant} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
        return [json.loads(Path(d, f'rank{i}.json').read_text()) for i in (0, 1)]

def table(res):
    "The markdown table of a run: per variant, the peak memory per rank and the step time, and their ratios to DDP's unfused"
    rows, b = [], res['results'][VARIANTS[0]]
    lines = ["| variant | weights, gradients, optimizer state per rank | vs DDP unfused | peak memory per rank | vs DDP unfused "
             "| step time | vs DDP unfused |", "|---|---|---|---|---|---|---|"]
    for v in VARIANTS:
        r = res['results'][v]
        lines.append(f"| {v} | {r['state_mb']:.0f} MB | {r['state_mb']/b['state_mb']:.2f}x | {r['peak_mb']:.0f} MB | {r['peak_mb']/b['peak_mb']:.2f}x "
                     f"| {r['step_s']:.3f} s | {r['step_s']/b['step_s']:.2f}x |")
    return '\n'.join(lines)

def main():
    p = argparse.ArgumentParser()
    p.add_argument('--vocab', type=int, default=60000); p.add_argument('--emb', type=int, default=400)
    p.add_argument('--hid', type=int, default=1152); p.add_argument('--layers', type=int, default=3)
    p.add_argument('--bs', type=int, default=8); p.add_argument('--seq_len', type=int, default=72)
    p.add_argument('--steps', type=int, default=4); p.add_argument('--rounds', type=int, default=2)
    p.add_argument('--device', default='cpu'); p.add_argument('--json'); p.add_argument('--table')
    p.add_argument('--quick', action='store_true', help='tiny sizes, one round: a smoke test')
    p.add_argument('--worker', action='store_true'); p.add_argument('--variant'); p.add_argument('--out')
    args = p.parse_args()
    if args.quick: args.vocab, args.emb, args.hid, args.layers, args.steps, args.rounds = 500, 16, 32, 2, 2, 1
    if args.worker: return worker(args)
    if args.table: return print(table(json.loads(Path(args.table).read_text())))
    runs = {v: [] for v in VARIANTS}
    for _ in range(args.rounds):
        for v in VARIANTS: runs[v].append(launch(v, args))
    import torch, fastai
    res = {'machine': f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores" if args.device == 'cpu' else torch.cuda.get_device_name(),
           'torch': torch.__version__, 'fastai': fastai.__version__, 'args': {k: v for k, v in vars(args).items() if k not in ('worker', 'variant', 'out', 'json', 'table')},
           'results': {v: {'peak_mb': statistics.median(max(r['peak_mb'] for r in run) for run in rs),
                           'state_mb': statistics.median(max(r['state_mb'] for r in run) for run in rs),
                           'step_s': statistics.median(max(r['step_s'] for r in run) for run in rs),
                           'runs': rs} for v, rs in runs.items()}}
    print(table(res))
    if args.json: Path(args.json).write_text(json.dumps(res, indent=1) + '\n')

if __name__ == '__main__': main()
