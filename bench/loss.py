"""The decoder matmul and loss alone, forward + backward, at ULMFiT size (2304 positions x 400 -> 60,000 classes):
fastai's plain loss, an out-of-place -inf mask, PadCrossEntropyLossFlat (masking the logits in place), the fused pass
(`padguard()`'s default: the layer run inside the loss in chunks), and torch's chunked `F.linear_cross_entropy` with a
-inf bias on the pad column (torch >= 2.13); plus what a fresh logits-sized buffer costs. Peak memory: on CUDA from the
allocator, on a CPU the growth of the process's resident set during the call (Linux).

    python bench/loss.py [--reps 7] [--device cpu] [--vocab 60000] [--n 2304] [--emb 400]
"""
import argparse, statistics, time, warnings
from pathlib import Path
warnings.filterwarnings('ignore')
import torch, torch.nn as nn, torch.nn.functional as F
from fastai.losses import CrossEntropyLossFlat
from fastai_padguard.losses import PadCrossEntropyLossFlat
from fastai_padguard.fused import FusedLogits, FusedHead

def _status(key):
    for l in Path('/proc/self/status').read_text().splitlines():
        if l.startswith(key): return int(l.split()[1])*1024

def main():
    p = argparse.ArgumentParser(); p.add_argument('--reps', type=int, default=7); p.add_argument('--device', default='cpu')
    p.add_argument('--n', type=int, default=2304); p.add_argument('--vocab', type=int, default=60000); p.add_argument('--emb', type=int, default=400)
    a = p.parse_args(); dev = torch.device(a.device); cuda = dev.type == 'cuda'
    g = torch.Generator().manual_seed(0)
    h = torch.randn(a.n, a.emb, generator=g).to(dev).requires_grad_()
    W = (torch.randn(a.vocab, a.emb, generator=g)*0.05).to(dev).requires_grad_(); b = torch.zeros(a.vocab, device=dev, requires_grad=True)
    t = torch.randint(2, a.vocab, (a.n,), generator=g).to(dev)
    pad = torch.tensor([1], device=dev)
    plain, ours = CrossEntropyLossFlat(), PadCrossEntropyLossFlat(1)
    fs = {'plain CrossEntropyLossFlat': lambda: plain(F.linear(h, W, b), t),
          'out-of-place -inf mask + plain loss': lambda: plain(F.linear(h, W, b).index_fill(1, pad, -float('inf')), t),
          'PadCrossEntropyLossFlat': lambda: ours(F.linear(h, W, b), t),
          'fused: padguard() default': lambda: ours(FusedLogits(h, W, b, FusedHead(nn.Linear(1, 1))), t)}
    if cuda:  # the GPU peers, where they install (pip install liger-kernel cut-cross-entropy); a -inf bias leaves the pad out
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
            liger = LigerFusedLinearCrossEntropyLoss()
            fs['peer: Liger fused linear CE, -inf pad bias'] = lambda: liger(W, h, t, b.index_fill(0, pad, -float('inf')))
        except ImportError: print('liger-kernel not installed: no Liger peer')
        try:
            from cut_cross_entropy import linear_cross_entropy as cce
            fs['peer: Cut Cross-Entropy, -inf pad bias'] = lambda: cce(h, W, t, bias=b.index_fill(0, pad, -float('inf')))
        except ImportError: print('cut-cross-entropy not installed: no CCE peer')
    if hasattr(F, 'linear_cross_entropy'):
        fs['peer: torch F.linear_cross_entropy, -inf pad bias'] = lambda: F.linear_cross_entropy(
            h, W, t, linear_bias=b.index_fill(0, pad, -float('inf')), options=torch.nn.LinearCrossEntropyOptions())
    def timed(f):
        if cuda: torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
        else:
            base = _status('VmRSS:')
            try: Path('/proc/self/clear_refs').write_text('5')
            except OSError: pass
        t0 = time.perf_counter(); f()
        if cuda: torch.cuda.synchronize()
        peaks.setdefault(cur[0], []).append((torch.cuda.max_memory_allocated() if cuda else _status('VmHWM:')) - base)
        return time.perf_counter() - t0
    peaks, cur = {}, [None]
    for k,f in fs.items(): cur[0] = k; f().backward()
    res = {k: [] for k in fs}
    for _ in range(a.reps):
        for k,f in fs.items():
            for x in (h, W, b): x.grad.zero_()  # kept, as fastai's zero_grad keeps them
            cur[0] = k
            res[k].append(timed(lambda: f().backward()))
    base = statistics.median(res['plain CrossEntropyLossFlat'])
    print(f"F.linear + loss, forward + backward, {a.n} x {a.emb} -> {a.vocab} on {a.device}, median of {a.reps}; "
          f"memory: the most it grew over what was resident (gradients kept from the warm-up)")
    for k,v in res.items():
        print(f"  {k:50} {statistics.median(v)*1e3:9.2f} ms  {statistics.median(v)/base:.3f}x  grows {max(peaks[k])/2**20:.0f} MiB")
    x = torch.randn(a.n, a.vocab, device=dev); y = torch.empty_like(x)
    print(f"a logits-sized buffer ({x.numel()*4/2**20:.0f} MB): clone into a fresh one "
          f"{statistics.median(timed(lambda: x.clone()) for _ in range(a.reps)):.3f} s, "
          f"copy_ into an existing one {statistics.median(timed(lambda: y.copy_(x)) for _ in range(a.reps)):.3f} s")

if __name__ == '__main__': main()
