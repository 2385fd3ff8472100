"""A whole `fit_one_cycle(1)` of a small tied AWD-LSTM LM, with validation and metrics: plain fastai vs `padguard(fused=False)`
vs `padguard()` (issue 26: the rows found, training and validation without the tokens x vocab logits).

    python bench/fit.py [--device cuda] [--vocab 60000] [--reps 3] [--json bench/results-fit.json]
    python bench/fit.py --table bench/results-fit.json     # bench/README's markdown table from a saved run

Times: the variants' fits interleaved in one process after a warm-up fit each, median of `--reps`. Peak memory: each variant
in a fresh process, the growth of the peak over what was resident once the learner was built and before `padguard()` ran
(so the guard's own first resolution counts), over one whole fit: on CPU the process's peak resident set size (reset
through Linux's `/proc/self/clear_refs`), on CUDA the allocator's `max_memory_allocated`.
"""
import argparse, json, os, platform, statistics, subprocess, sys, time, warnings
warnings.filterwarnings('ignore')
import torch, fastai
from fastai.text.all import *
from fastai_padguard.all import *
from step import peak_rss, reset_peak_rss

VARIANTS = ['plain fastai', 'padguard(fused=False)', 'padguard()']

def make(args):
    "DataLoaders of `steps` training and `valid` validation batches of `bs x seq_len` tokens, and the model's initial weights"
    V, g = args.vocab, torch.Generator().manual_seed(0)
    n, nv = args.bs*args.steps, args.bs*args.valid
    x = torch.randint(2, V, (n+nv, args.seq_len+1), generator=g)
    ds = [(x[i,:-1], x[i,1:]) for i in range(n+nv)]
    dls = DataLoaders.from_dsets(ds[:n], ds[n:], bs=args.bs, device=torch.device(args.device), shuffle=False, drop_last=True)
    cfg = {**awd_lstm_lm_config, 'emb_sz': args.emb, 'n_hid': args.hid, 'n_layers': args.layers}
    torch.manual_seed(0)
    return dls, cfg, get_language_model(AWD_LSTM, V, config=dict(cfg)).state_dict()

def learner(dls, cfg, state, args):
    model = get_language_model(AWD_LSTM, args.vocab, config=dict(cfg)); model.load_state_dict(state)
    learn = Learner(dls, model.to(args.device), loss_func=CrossEntropyLossFlat(), metrics=[accuracy, Perplexity()],
                    cbs=[ModelResetter, RNNCallback, RNNRegularizer(alpha=2, beta=1)], splitter=awd_lstm_lm_split, wd=0.01)
    learn.remove_cb(ProgressCallback); learn.logger = noop
    return learn

def guard(learn, variant):
    if variant == 'padguard()': learn.padguard()
    elif variant == 'padguard(fused=False)': learn.padguard(fused=False)
    return learn

def sync(args):
    if args.device.startswith('cuda'): torch.cuda.synchronize()

def fit(learn, args):
    "One whole fit, timed: the rows found (padguard), training, validation with accuracy and perplexity"
    sync(args); t0 = time.perf_counter()
    learn.fit_one_cycle(1, 1e-3)
    sync(args); return time.perf_counter() - t0

def memory(variant, args):
    "Peak growth of one whole fit of `variant`, in this (fresh) process"
    dls, cfg, state = make(args)
    learn = learner(dls, cfg, state, args)
    cuda = args.device.startswith('cuda')
    if cuda: sync(args); base = torch.cuda.memory_allocated(); torch.cuda.reset_peak_memory_stats()
    else:
        base = peak_rss('VmRSS:')
        if not reset_peak_rss(): return None
    fit(guard(learn, variant), args)
    peak = torch.cuda.max_memory_allocated() if cuda else peak_rss()
    return {'growth_bytes': peak - base, 'valid_loss': float(learn.recorder.values[-1][1])}

def markdown(res)->str:
    "bench/README's table from a results JSON"
    c, vs = res['config'], res['variants']
    p0 = vs['plain fastai']
    lines = [f"`{res['command'].strip()}` on {res['device']} ({res['machine']}, {res['threads']} threads); vocab {c['vocab']}, emb {c['emb']}, "
             f"hidden {c['hid']} x {c['layers']} layers, {c['steps']} training and {c['valid']} validation batches of {c['bs']} x {c['seq_len']} "
             f"tokens, metrics accuracy and perplexity, {c['reps']} rounds:", '',
             '| variant | whole fit | ratio to plain | spread (min-max ratio) | peak growth in the fit | vs plain | valid loss |',
             '|---|---:|---:|---:|---:|---:|---:|']
    for v,d in vs.items():
        g = f"{d['growth_mb']:.0f} MB | {d['growth_mb']/p0['growth_mb']:.2f}x" if 'growth_mb' in d else '- | -'
        lines.append(f"| {v} | {d['median_s']:.3f} s | {d['ratio']:.3f}x | {d['min_ratio']:.3f}-{d['max_ratio']:.3f} | {g} | "
                     f"{d.get('valid_loss', float('nan')):.6f} |")
    return '\n'.join(lines)

def main():
    if len(sys.argv) == 3 and sys.argv[1] == '--table': return print(markdown(json.loads(Path(sys.argv[2]).read_text())))
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--device', default='cpu'); p.add_argument('--vocab', type=int, default=60000)
    p.add_argument('--emb', type=int, default=32); p.add_argument('--hid', type=int, default=64); p.add_argument('--layers', type=int, default=2)
    p.add_argument('--bs', type=int, default=16); p.add_argument('--seq-len', type=int, default=72)
    p.add_argument('--steps', type=int, default=3); p.add_argument('--valid', type=int, default=2); p.add_argument('--reps', type=int, default=3)
    p.add_argument('--quick', action='store_true', help='tiny sizes: checks the script runs, says nothing about speed')
    p.add_argument('--json', default=None); p.add_argument('--_memory', default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick: args.vocab, args.emb, args.hid, args.layers, args.bs, args.seq_len, args.steps, args.valid, args.reps = 512, 16, 32, 1, 4, 8, 2, 1, 1
    if args._memory: return print(json.dumps(memory(args._memory, args)))
    dls, cfg, state = make(args)
    learns = {v: guard(learner(dls, cfg, state, args), v) for v in VARIANTS}
    times = {v: [] for v in VARIANTS}
    for v in VARIANTS: fit(learns[v], args)  # warm-up: allocator, optimizer state, caches
    for _ in range(args.reps):
        for v in VARIANTS: times[v].append(fit(learns[v], args))
    base = statistics.median(times['plain fastai'])
    cuda = args.device.startswith('cuda')
    res = {'machine': f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, fastai {fastai.__version__}",
           'device': args.device if not cuda else torch.cuda.get_device_name(), 'threads': torch.get_num_threads(),
           'config': {k: getattr(args, k) for k in ('vocab','emb','hid','layers','bs','seq_len','steps','valid','reps','quick')},
           'command': 'python bench/fit.py ' + ' '.join(a for a in sys.argv[1:] if not a.startswith('--json') and not a.endswith('.json')), 'variants': {}}
    for v in VARIANTS:
        med = statistics.median(times[v])
        res['variants'][v] = {'median_s': med, 'ratio': med/base, 'min_ratio': min(times[v])/base, 'max_ratio': max(times[v])/base, 'n': len(times[v])}
        out = subprocess.run([sys.executable, __file__, '--_memory', v] + sys.argv[1:], capture_output=True, text=True, check=True).stdout
        m = json.loads(out.strip().splitlines()[-1])
        if m: res['variants'][v].update(growth_mb=m['growth_bytes']/2**20, valid_loss=m['valid_loss'])
    print(markdown(res))
    if args.json: Path(args.json).write_text(json.dumps(res, indent=1))

if __name__ == '__main__': main()
