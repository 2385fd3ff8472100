"""Time full fastai training steps of a ULMFiT-size AWD-LSTM LM: plain fastai vs PadGuard vs padguard() vs workarounds.

    python bench/step.py [--device cuda] [--vocab 60000] [--reps 4] [--steps 3] [--quick] [--json bench/results.json]
    python bench/step.py --table bench/results.json     # README's markdown table from a saved run

Variants run interleaved in one process (after a warm-up), so drifts in machine speed hit them alike; the table gives the
median step time, its ratio to plain fastai and the spread (min-max over all timed steps). Peak memory is measured per
variant in a fresh process: the peak during a training step, from the CUDA allocator's statistics or, on CPU, the
process's peak resident set size reset before each step (Linux `/proc/self/clear_refs`).
"""
import argparse, json, os, platform, resource, statistics, subprocess, sys, time, warnings
warnings.filterwarnings('ignore')
import torch, fastai
from fastai.text.all import *
from fastai_padguard.all import *

VARIANTS = ['plain fastai', 'PadGuard alone', 'padguard() (guard + loss)', 'workaround: grad hook', 'workaround: masked logits',
            'padguard(fused=False)', 'peer: torch F.linear_cross_entropy']
# what `padguard()` was before the fused path (issue 16) is `padguard(fused=False)`; saved runs from then name it 'padguard() (guard + loss)'
DEFAULT = VARIANTS[:5]
FUSED = ['plain fastai', 'padguard(fused=False)', 'padguard() (guard + loss)', 'peer: torch F.linear_cross_entropy',
         'floor: no output layer, no loss']

class HiddenOut(nn.Module):
    "The decoder moved into the loss: the model returns the hidden states, the loss runs the layer"
    def __init__(self, lin): super().__init__(); self.lin = lin
    def forward(self, x): return x

class HiddenMean:
    "The floor: what a step holds without any output layer or loss (the loss is the hidden states' mean)"
    def __call__(self, h, t): return h.float().mean()

class TorchLinearCE:
    "torch's chunked `F.linear_cross_entropy` (torch >= 2.13), with the pad column out of the softmax by a `-inf` bias"
    def __init__(self, lin, pad): self.lin, self.pad = lin, pad
    def __call__(self, h, t):
        b = self.lin.bias.index_fill(0, torch.tensor([self.pad], device=h.device), -float('inf'))
        return F.linear_cross_entropy(h.reshape(-1, h.shape[-1]), self.lin.weight, t.reshape(-1), linear_bias=b,
                                      options=torch.nn.LinearCrossEntropyOptions())

class MaskedLogitsLoss(CrossEntropyLossFlat):
    "What people write instead: mask the pad logit out of place, then fastai's loss"
    def __init__(self, pad): super().__init__(); self.pad = pad
    def __call__(self, inp, targ, **kw): return super().__call__(inp.index_fill(-1, torch.tensor([self.pad], device=inp.device), -float('inf')), targ, **kw)

def reset_peak_rss():
    "Linux: reset the process's peak resident set size (VmHWM); False where that isn't possible"
    try: Path('/proc/self/clear_refs').write_text('5'); return True
    except OSError: return False

def peak_rss(key='VmHWM:'):
    "Linux: the process's peak resident set size (VmHWM) in bytes, or another field of /proc/self/status (VmRSS: now)"
    for l in Path('/proc/self/status').read_text().splitlines():
        if l.startswith(key): return int(l.split()[1])*1024

class StepTimer(Callback):
    "Time each training batch (a full step: forward, loss, backward, optimizer); optionally its peak memory"
    pred_after_step = False  # reads no learn.pred: the fused path keeps no copy of the head's weight for it
    order = 100
    def __init__(self, cuda, memory=False): self.cuda,self.memory,self.times,self.peaks,self.growth,self.fb = cuda,memory,[],[],[],[]
    def before_validate(self): raise CancelValidException()  # only training steps are measured
    def before_batch(self):
        if not self.training: return
        if self.memory:
            self.base = torch.cuda.memory_allocated() if self.cuda else peak_rss('VmRSS:')  # what is resident before the step
            if self.cuda: torch.cuda.reset_peak_memory_stats()
            elif not reset_peak_rss(): self.memory = False
        if self.cuda: torch.cuda.synchronize()
        self.t0 = time.perf_counter()
    def after_backward(self):  # the peak up to here: forward, loss and backward, without the optimizer's step
        if self.memory and self.training:
            if self.cuda: torch.cuda.synchronize()
            self.fb.append((torch.cuda.max_memory_allocated() if self.cuda else peak_rss()) - self.base)
    def after_batch(self):
        if not self.training: return
        if self.cuda: torch.cuda.synchronize()
        self.times.append(time.perf_counter()-self.t0)
        if self.memory:
            self.peaks.append(torch.cuda.max_memory_allocated() if self.cuda else peak_rss())
            self.growth.append(self.peaks[-1] - self.base)

class SyncDebug(Callback):
    "Run each training batch (forward, loss, backward, guard, optimizer step) under torch.cuda.set_sync_debug_mode('warn')"
    pred_after_step = False  # reads no learn.pred: the fused path keeps no copy of the head's weight for it
    order = -100  # first in before_batch; in after_batch before the Recorder, whose per-batch bookkeeping is fastai's, not a step's
    def __init__(self): self.steps, self.syncs = 0, []
    def before_validate(self): raise CancelValidException()
    def before_batch(self):
        if not self.training: return
        self._w = warnings.catch_warnings(record=True); self._rec = self._w.__enter__(); warnings.simplefilter('always')
        torch.cuda.set_sync_debug_mode('warn')
    def after_batch(self):
        if not self.training: return
        torch.cuda.set_sync_debug_mode(0)
        self._w.__exit__(None, None, None)
        self.steps += 1
        self.syncs += [f"{Path(w.filename).name}:{w.lineno}: {str(w.message)[:80]}" for w in self._rec if 'synchronizing' in str(w.message) and 'prototype' not in str(w.message)]

class ItemPerStep(Callback):
    "The control: a callback that syncs once per step, as `.item()` does"
    pred_after_step = False  # reads no learn.pred: the fused path keeps no copy of the head's weight for it
    order = 50
    def after_backward(self): self.learn.loss_grad.item()

def sync_debug(learn, n=20):
    "`n` training steps of `learn` under CUDA's sync debugger, the synchronizing calls seen by place; and a control step that syncs"
    cb, ctl = SyncDebug(), SyncDebug()
    torch.cuda.synchronize()
    while cb.steps < n: learn.fit(1, 1e-3, cbs=cb)
    learn.fit(1, 1e-3, cbs=[ctl, ItemPerStep()])
    return {'steps': cb.steps, 'syncs': sorted(set(cb.syncs)), 'n_syncs': len(cb.syncs), 'control_syncs': len(ctl.syncs)}

def make(args):
    "Model, data and one learner per variant (sharing the model's initial weights)"
    V, dev = args.vocab, torch.device(args.device)
    cfg = {**awd_lstm_lm_config, 'emb_sz': args.emb, 'n_hid': args.hid, 'n_layers': args.layers}
    g = torch.Generator().manual_seed(0)
    n = args.bs*args.steps
    x = torch.randint(2, V, (n, args.seq_len+1), generator=g)
    ds = [(x[i,:-1], x[i,1:]) for i in range(n)]
    dls = DataLoaders.from_dsets(ds, ds[:args.bs], bs=args.bs, device=dev, shuffle=False, drop_last=True)
    torch.manual_seed(0)
    state = get_language_model(AWD_LSTM, V, config=dict(cfg)).state_dict()
    return dls, cfg, state

def learner(variant, dls, cfg, state, args):
    model = get_language_model(AWD_LSTM, args.vocab, config=dict(cfg)); model.load_state_dict(state)
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), cbs=[ModelResetter, RNNCallback, RNNRegularizer(alpha=2, beta=1)],
                    splitter=awd_lstm_lm_split, wd=0.01, default_cbs=True)
    learn.remove_cb(ProgressCallback); learn.logger = noop
    if variant == 'PadGuard alone': learn.add_cb(PadGuard())
    elif variant == 'padguard() (guard + loss)': learn.padguard(loss=True, chunk=args.chunk)
    elif variant == 'workaround: grad hook':
        w = learn.model[0].encoder.weight
        w.register_hook(lambda g: g.index_fill(0, torch.tensor([1], device=g.device), 0.))
    elif variant == 'workaround: masked logits': learn.loss_func = MaskedLogitsLoss(1)
    elif variant == 'padguard(fused=False)': learn.padguard(loss=True, fused=False)
    elif variant == 'peer: torch F.linear_cross_entropy':
        lin = learn.model[1].decoder
        learn.model[1].decoder = HiddenOut(lin)
        learn.loss_func = TorchLinearCE(lin, 1)
    elif variant == 'floor: no output layer, no loss':
        learn.model[1].decoder = HiddenOut(learn.model[1].decoder)
        learn.loss_func = HiddenMean()
    learn.model.to(args.device)
    return learn

def run_steps(learn, timer):
    learn.fit(1, 1e-3, cbs=timer)   # `steps` training batches; the timer skips validation

def peak_memory(variant, args):
    "Peak memory of `args.steps` steps of one variant, in a fresh process (CPU) or from the CUDA allocator"
    cmd = [sys.executable, __file__, '--_memory', variant] + [a for a in sys.argv[1:] if a != '--no-memory']
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])

def markdown(res)->str:
    "README's table from a results JSON"
    sd = res.get('sync_debug')
    if sd:  # torch's one-time notice that the sync debugger is a prototype is not a sync
        sd['syncs'] = [x for x in sd['syncs'] if 'prototype' not in x]; sd['n_syncs'] = len(sd['syncs'])
    c = res['config']
    grow = any('growth_mb' in d for d in res['variants'].values())
    floor = res['variants'].get('floor: no output layer, no loss', {}).get('growth_mb')  # what the step holds without head and loss
    lines = [f"`{res['command']}` on {res['device']} ({res['machine']}, {res['threads']} threads); vocab {c['vocab']}, "
             f"emb {c['emb']}, hidden {c['hid']} x {c['layers']} layers, bs {c['bs']} x {c['seq_len']}, {c['reps']} rounds of {c['steps']} steps:", '',
             f"PadGuard's own per-step work (its `after_backward` + the write-back in the step, timed directly): {res['guard_events_us']:.0f} µs, "
             f"{res['guard_events_share']*100:.4f}% of a plain step.", '',
             '| variant | median step | ratio to plain | spread (min-max ratio) | peak memory | vs plain |' +
             (' growth in a step | vs plain |' + (' output layer + loss (growth above the floor) | vs plain |' if floor else '') if grow else ''),
             '|---|---:|---:|---:|---:|---:|' + ('---:|---:|' + ('---:|---:|' if floor else '') if grow else '')]
    p0 = res['variants'].get('plain fastai', {})
    for v,d in res['variants'].items():
        mem = f"{d['peak_mb']:.0f} MB | {d['peak_delta_mb']:+.0f} MB" if 'peak_mb' in d else '- | -'
        if grow: mem += f" | {d['growth_mb']:.0f} MB | {d['growth_mb']/p0['growth_mb']*100:.0f}%" if 'growth_mb' in d and p0.get('growth_mb') else ' | - | -'
        if grow and floor is not None:
            a, a0 = d.get('growth_mb', floor) - floor, p0['growth_mb'] - floor
            mem += ' | - | -' if 'floor' in v else f" | {a:.0f} MB | {a/a0*100:.0f}%"
        t = f"{d['median_s']*1e3:.1f} ms" if d['median_s'] < 1 else f"{d['median_s']:.3f} s"
        lines.append(f"| {v} | {t} | {d['ratio']:.3f}x | {d['min_ratio']:.3f}-{d['max_ratio']:.3f} | {mem} |")
    sd = res.get('sync_debug')
    if sd: lines += ['', f"`padguard()` under `torch.cuda.set_sync_debug_mode('warn')`, {sd['steps']} training steps: "
                         f"{sd['n_syncs']} synchronizing calls" + (': ' + '; '.join(f'`{x}`' for x in sd['syncs']) if sd['syncs'] else '') +
                         (f" (the control, one `.item()` per step, is seen {sd['control_syncs']} times)" if 'control_syncs' in sd else '') + '.']
    return '\n'.join(lines)

def main():
    if len(sys.argv) == 3 and sys.argv[1] == '--table': return print(markdown(json.loads(Path(sys.argv[2]).read_text())))
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--device', default='cpu'); p.add_argument('--vocab', type=int, default=60000)
    p.add_argument('--emb', type=int, default=400); p.add_argument('--hid', type=int, default=1152); p.add_argument('--layers', type=int, default=3)
    p.add_argument('--bs', type=int, default=32); p.add_argument('--seq-len', type=int, default=72)
    p.add_argument('--reps', type=int, default=4); p.add_argument('--steps', type=int, default=3)
    p.add_argument('--quick', action='store_true', help='tiny sizes: checks the script runs, says nothing about speed')
    p.add_argument('--no-memory', action='store_true'); p.add_argument('--json', default=None)
    p.add_argument('--sync-only', action='store_true', help="only the run under CUDA's sync debugger")
    p.add_argument('--chunk', type=int, default=None, help="tokens per chunk of padguard()'s fused pass (default: from the sizes)")
    p.add_argument('--fused', action='store_true', help="plain fastai, padguard(fused=False), padguard() (fused) and torch's F.linear_cross_entropy")
    p.add_argument('--_memory', default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick: args.vocab, args.emb, args.hid, args.layers, args.bs, args.seq_len, args.reps, args.steps = 512, 16, 32, 2, 4, 8, 2, 2
    cuda = args.device.startswith('cuda')
    dls, cfg, state = make(args)
    if args._memory:
        learn = learner(args._memory, dls, cfg, state, args)
        t = StepTimer(cuda, memory=True); run_steps(learn, t)
        # peak during a training step (the first one, which also builds optimizer state, left out when there are more)
        peak = max(t.peaks[1:] or t.peaks) if t.peaks else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss*1024
        growth = max(t.growth[1:] or t.growth) if t.growth else None
        fb = max(t.fb[1:] or t.fb) if t.fb else None
        print(json.dumps({'peak_bytes': peak, 'growth_bytes': growth, 'fwd_bwd_bytes': fb})); return
    if args.sync_only: return print(json.dumps(sync_debug(learner(VARIANTS[2], dls, cfg, state, args))))
    variants = FUSED if args.fused else DEFAULT
    if args.fused and not hasattr(F, 'linear_cross_entropy'): variants = [v for v in variants if 'torch F.' not in v]  # torch < 2.13
    learns = {v: learner(v, dls, cfg, state, args) for v in variants}
    times = {v: [] for v in variants}
    for v in variants: run_steps(learns[v], StepTimer(cuda))   # warm-up: allocator, optimizer state, caches
    for r in range(args.reps):
        for v in variants:
            t = StepTimer(cuda); run_steps(learns[v], t); times[v] += t.times
    # the guard's own per-step work, timed directly (its cost hides in the noise of a whole step)
    g = learns['PadGuard alone' if 'PadGuard alone' in learns else 'padguard(fused=False)']; guard = g.pad_guard
    b = g.dls.train.one_batch(); g.xb, g.yb, g.training = b[:1], b[1:], True
    guard.before_fit(); guard.before_batch(); g.model.zero_grad(); g.model[0].encoder.weight.grad = torch.zeros_like(g.model[0].encoder.weight)
    g.model[1].decoder.bias.grad = torch.zeros_like(g.model[1].decoder.bias)
    if cuda: torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(200): guard.after_backward(); guard.write_back()
    if cuda: torch.cuda.synchronize()
    guard_us = (time.perf_counter()-t0)/200*1e6
    guard.after_fit(); g.model.zero_grad()
    base = statistics.median(times[VARIANTS[0]])
    sync = sync_debug(learns['padguard() (guard + loss)']) if cuda else None
    res = {'machine': f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, fastai {fastai.__version__}",
           'device': args.device if not cuda else torch.cuda.get_device_name(), 'threads': torch.get_num_threads(),
           'config': {k: getattr(args, k) for k in ('vocab','emb','hid','layers','bs','seq_len','reps','steps','quick')},
           'command': 'python bench/step.py ' + ' '.join(sys.argv[1:]), 'guard_events_us': guard_us,
           'guard_events_share': guard_us*1e-6/base, 'variants': {}, 'sync_debug': sync}
    for v in variants:
        med = statistics.median(times[v])
        res['variants'][v] = {'median_s': med, 'ratio': med/base, 'min_ratio': min(times[v])/base, 'max_ratio': max(times[v])/base, 'n': len(times[v])}
    if not args.no_memory:
        mems = {v: peak_memory(v, args) for v in variants}
        for v in variants:
            res['variants'][v].update(peak_mb=mems[v]['peak_bytes']/2**20, peak_delta_mb=(mems[v]['peak_bytes']-mems[VARIANTS[0]]['peak_bytes'])/2**20)
            if mems[v].get('growth_bytes') is not None: res['variants'][v]['growth_mb'] = mems[v]['growth_bytes']/2**20
            if mems[v].get('fwd_bwd_bytes') is not None: res['variants'][v]['fwd_bwd_mb'] = mems[v]['fwd_bwd_bytes']/2**20
    print(f"{res['device']} ({res['machine']}); vocab {args.vocab}, emb {args.emb}, hidden {args.hid}x{args.layers}, bs {args.bs}x{args.seq_len}")
    print(f"{'variant':36} {'median step':>12} {'ratio':>7} {'spread':>15} {'peak MB':>9} {'vs plain':>9} {'growth MB':>10} {'fwd+bwd MB':>10}")
    for v,d in res['variants'].items():
        print(f"{v:36} {d['median_s']:11.3f}s {d['ratio']:7.3f} {d['min_ratio']:6.3f}-{d['max_ratio']:<6.3f}  "
              f"{d.get('peak_mb', float('nan')):9.0f} {d.get('peak_delta_mb', float('nan')):+9.0f} {d.get('growth_mb', float('nan')):10.0f} {d.get('fwd_bwd_mb', float('nan')):10.0f}")
    print(f"PadGuard's own work per step (after_backward + write-back): {guard_us:.0f} us, {res['guard_events_share']*100:.4f}% of a plain step")
    if sync is not None:
        print(f"padguard() under torch.cuda.set_sync_debug_mode('warn'), {sync['steps']} training steps: {sync['n_syncs']} synchronizing calls"
              + ''.join(f"\n  {l}" for l in sync['syncs']) + f" (control, with one .item() per step: {sync['control_syncs']} seen)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=1))

if __name__ == '__main__': main()
