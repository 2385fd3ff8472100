"""Train 16 chosen rows of a Hugging Face LM (vocab 50,000) and nothing else: `learn.train_rows(rows)` beside PEFT's
TrainableTokens and beside the snapshot approach (the whole table trains, `PadGuard(mode='freeze')` puts every other row
back after each step). Each variant is a fastai Learner (AdamW, wd=0.01) on the same generated batches; the rest of the
model is frozen in all three. Time per step interleaved in one process after a warm-up (median, ratio to PEFT); peak
memory per variant in a fresh process (growth over what was resident before the step); the optimizer's state bytes.

    python bench/rows.py [--device cpu] [--vocab 50000] [--rows 16] [--reps 5] [--steps 3] [--json bench/results-rows.json]
    python bench/rows.py --table bench/results-rows.json
"""
import argparse, json, os, platform, statistics, subprocess, sys, warnings
warnings.filterwarnings('ignore')
import torch, fastai
from fastai.text.all import *
from fastai_padguard.all import *
from step import StepTimer

VARIANTS = ['PEFT TrainableTokens', 'train_rows (ours)', 'snapshot: whole table + PadGuard(freeze) of the others']

class Logits(Callback):
    pred_after_step = False  # reads learn.pred before the loss only
    def after_pred(self): self.learn.pred = self.pred.logits

def make(args):
    import transformers
    cfg = transformers.GPT2Config(vocab_size=args.vocab, n_positions=args.seq_len, n_embd=args.emb, n_layer=2, n_head=4,
                                  tie_word_embeddings=True, pad_token_id=0)
    torch.manual_seed(0)
    state = transformers.GPT2LMHeadModel(cfg).state_dict()
    g = torch.Generator().manual_seed(0)
    n = args.bs*args.steps
    x = torch.randint(1, args.vocab, (n, args.seq_len+1), generator=g)
    ds = [(x[i,:-1], x[i,1:]) for i in range(n)]
    dls = DataLoaders.from_dsets(ds, ds[:args.bs], bs=args.bs, device=args.device, shuffle=False, drop_last=True)
    rows = list(range(args.vocab - args.rows, args.vocab))  # the newest tokens
    return cfg, state, dls, rows

def learner(variant, cfg, state, dls, rows, args):
    import transformers, peft
    m = transformers.GPT2LMHeadModel(cfg); m.load_state_dict(state)
    for p in m.parameters(): p.requires_grad_(False)
    if variant == VARIANTS[0]:
        m = peft.get_peft_model(m, peft.TrainableTokensConfig(target_modules=['wte'], token_indices=rows))
    learn = Learner(dls, m, loss_func=CrossEntropyLossFlat(), cbs=Logits(), wd=0.01)
    learn.remove_cb(ProgressCallback); learn.logger = noop
    if variant == VARIANTS[1]: learn.padguard(pad_idx=0, loss=False, fused=False).train_rows(rows)
    elif variant == VARIANTS[2]:
        m.transformer.wte.weight.requires_grad_(True)
        keep = sorted(set(range(args.vocab)) - set(rows) - {0})
        learn.add_cb(PadGuard(pad_idx=0, mode='freeze', extra_idxs=keep, fused=False))
    learn.model.to(args.device)
    return learn

def opt_bytes(learn):
    return sum(v.numel()*v.element_size() for st in learn.opt.state.values() for v in st.values() if isinstance(v, Tensor))

def run(learn, timer): learn.fit(1, 1e-3, cbs=timer)

def markdown(res)->str:
    c = res['config']
    lines = [f"`{res['command']}` on {res['device']} ({res['machine']}); GPT-2 layout, vocab {c['vocab']}, emb {c['emb']}, 2 layers, "
             f"bs {c['bs']} x {c['seq_len']}, {c['rows']} chosen rows, {c['reps']} rounds of {c['steps']} steps:", '',
             '| variant | median step | ratio to PEFT | peak memory growth in a step | optimizer state |', '|---|---:|---:|---:|---:|']
    for v,d in res['variants'].items():
        t = f"{d['median_s']*1e3:.1f} ms" if d['median_s'] < 1 else f"{d['median_s']:.3f} s"
        g = f"{d['growth_mb']:.0f} MB" if d.get('growth_mb') is not None else '-'
        lines.append(f"| {v} | {t} | {d['ratio']:.3f}x | {g} | {d['opt_bytes']/2**10:.1f} KiB |")
    return '\n'.join(lines)

def main():
    if len(sys.argv) == 3 and sys.argv[1] == '--table': return print(markdown(json.loads(Path(sys.argv[2]).read_text())))
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--device', default='cpu'); p.add_argument('--vocab', type=int, default=50000); p.add_argument('--emb', type=int, default=256)
    p.add_argument('--rows', type=int, default=16); p.add_argument('--bs', type=int, default=8); p.add_argument('--seq-len', type=int, default=64)
    p.add_argument('--reps', type=int, default=5); p.add_argument('--steps', type=int, default=3)
    p.add_argument('--quick', action='store_true'); p.add_argument('--json', default=None); p.add_argument('--no-memory', action='store_true')
    p.add_argument('--_memory', default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick: args.vocab, args.emb, args.bs, args.seq_len, args.reps, args.steps = 300, 16, 2, 8, 1, 2
    cuda = args.device.startswith('cuda')
    cfg, state, dls, rows = make(args)
    if args._memory:
        t = StepTimer(cuda, memory=True); run(learner(args._memory, cfg, state, dls, rows, args), t)
        g = max(t.growth[1:] or t.growth) if t.growth else None
        return print(json.dumps({'growth_bytes': g}))
    learns = {v: learner(v, cfg, state, dls, rows, args) for v in VARIANTS}
    times = {v: [] for v in VARIANTS}
    for v in VARIANTS: run(learns[v], StepTimer(cuda))
    for _ in range(args.reps):
        for v in VARIANTS:
            t = StepTimer(cuda); run(learns[v], t); times[v] += t.times
    base = statistics.median(times[VARIANTS[0]])
    import peft
    res = {'machine': f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, fastai {fastai.__version__}, "
                      f"peft {peft.__version__}", 'device': args.device if not cuda else torch.cuda.get_device_name(),
           'config': {k: getattr(args, k) for k in ('vocab','emb','rows','bs','seq_len','reps','steps','quick')},
           'command': 'python bench/rows.py ' + ' '.join(sys.argv[1:]), 'variants': {}}
    for v in VARIANTS:
        med = statistics.median(times[v])
        res['variants'][v] = {'median_s': med, 'ratio': med/base, 'opt_bytes': opt_bytes(learns[v])}
        if not args.no_memory:
            cmd = [sys.executable, __file__, '--_memory', v] + [a for a in sys.argv[1:] if a != '--no-memory']
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            g = json.loads(out.strip().splitlines()[-1])['growth_bytes']
            res['variants'][v]['growth_mb'] = None if g is None else g/2**20
    print(markdown(res))
    if args.json: Path(args.json).write_text(json.dumps(res, indent=1))

if __name__ == '__main__': main()
