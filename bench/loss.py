"""The decoder matmul and loss alone, forward + backward, at ULMFiT size (2304 positions x 400 -> 60,000 classes):
fastai's plain loss, an out-of-place -inf mask, and PadCrossEntropyLossFlat; plus what a fresh logits-sized buffer costs.

    python bench/loss.py [--reps 7] [--device cpu]
"""
import argparse, statistics, time, warnings
warnings.filterwarnings('ignore')
import torch, torch.nn.functional as F
from fastai.losses import CrossEntropyLossFlat
from fastai_padguard.losses import PadCrossEntropyLossFlat, _MaskedCE

def copy_path(f):
    "Run `f` with the loss masking a copy of the logits instead of the logits in place"
    def g():
        _MaskedCE.in_place = False
        try: return f()
        finally: _MaskedCE.in_place = True
    return g

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
          'PadCrossEntropyLossFlat, masking a copy': copy_path(lambda: ours(F.linear(h, W, b), t))}
    def timed(f):
        if cuda: torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter(); f()
        if cuda: torch.cuda.synchronize(); peaks.setdefault(cur[0], []).append(torch.cuda.max_memory_allocated())
        return time.perf_counter() - t0
    peaks, cur = {}, [None]
    for k,f in fs.items(): cur[0] = k; f().backward()
    res = {k: [] for k in fs}
    for _ in range(a.reps):
        for k,f in fs.items():
            h.grad = W.grad = b.grad = None
            cur[0] = k
            res[k].append(timed(lambda: f().backward()))
    base = statistics.median(res['plain CrossEntropyLossFlat'])
    print(f"F.linear + loss, forward + backward, {a.n} x {a.emb} -> {a.vocab} on {a.device}, median of {a.reps}:")
    for k,v in res.items():
        mem = f"  peak {max(peaks[k])/2**20:.0f} MiB" if cuda else ''
        print(f"  {k:42} {statistics.median(v)*1e3:9.2f} ms  {statistics.median(v)/base:.3f}x{mem}")
    x = torch.randn(a.n, a.vocab, device=dev); y = torch.empty_like(x)
    print(f"a logits-sized buffer ({x.numel()*4/2**20:.0f} MB): clone into a fresh one "
          f"{statistics.median(timed(lambda: x.clone()) for _ in range(a.reps)):.3f} s, "
          f"copy_ into an existing one {statistics.median(timed(lambda: y.copy_(x)) for _ in range(a.reps)):.3f} s")

if __name__ == '__main__': main()
