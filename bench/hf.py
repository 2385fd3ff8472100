"""Inside the Hugging Face Trainer: fastai_padguard beside the peers a Trainer user has. Each variant is a `Trainer` (AdamW,
wd 0.01) on the same generated batches; step time interleaved in one process after a warm-up (median, ratio to the first
variant); memory per variant in a fresh process (the growth of the resident set, or of CUDA's allocated peak, in a step
over what was there before it).

    --part rows: train 16 added rows of a GPT-2-layout model (vocab 50,000, tied) and nothing else: PEFT's TrainableTokens,
                 `loop.train_rows` + `PadGuardCallback` (with HF's own loss, and with the callback's), and the whole table
                 training (what a user does without either); the optimizer's state bytes
    --part loss: a Llama-layout model in bf16 (untied, vocab 128,000 by default): HF's default loss (`ForCausalLMLoss`, which
                 upcasts the logits to float32) beside `PadGuardCallback`'s loss, over the logits and fused (the output layer run
                 inside the loss in chunks)

    python bench/hf.py --part rows [--device cpu] [--json bench/results-hf-rows.json]
    python bench/hf.py --part loss --vocab 250000 [--json bench/results-hf-loss-250k.json]
    python bench/hf.py --table bench/<saved run>.json
"""
import argparse, json, os, platform, statistics, subprocess, sys, time, warnings
warnings.filterwarnings('ignore')
from pathlib import Path
import torch
import transformers as T
from transformers import TrainerCallback
from fastai_padguard.hf import PadGuardCallback
from fastai_padguard.loop import train_rows
from step import peak_rss, reset_peak_rss

ROWS = ['PEFT TrainableTokens', 'train_rows (ours), HF loss', 'train_rows (ours), its loss', 'whole table trains']
LOSS = ["HF's default loss", 'PadGuardCallback, HF loss', 'PadGuardCallback, its loss', 'PadGuardCallback, its loss fused']

class StepClock(TrainerCallback):
    "Each optimizer step's time (forward, loss, backward, clip, step) and, with `memory`, its growth over what was resident before"
    def __init__(self, cuda, memory=False): self.cuda,self.memory,self.times,self.growth = cuda,memory,[],[]
    def _sync(self):
        if self.cuda: torch.cuda.synchronize()
    def on_step_begin(self, args, state, control, **kw):
        if self.memory:
            self.base = torch.cuda.memory_allocated() if self.cuda else peak_rss('VmRSS:')
            if self.cuda: torch.cuda.reset_peak_memory_stats()
            elif not reset_peak_rss(): self.memory = False
        self._sync(); self.t0 = time.perf_counter()
    def on_step_end(self, args, state, control, **kw):
        self._sync(); self.times.append(time.perf_counter() - self.t0)
        if self.memory: self.growth.append((torch.cuda.max_memory_allocated() if self.cuda else peak_rss()) - self.base)

def data(args):
    "`bs * steps` items of `seq_len` generated ids, the last 8 of each padded (id 0, label -100)"
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, args.vocab, (args.bs * args.steps, args.seq_len), generator=g)
    x[:, -8:] = 0
    return [{'input_ids': r, 'attention_mask': (r != 0).long(), 'labels': r.masked_fill(r == 0, -100)} for r in x]

def model_of(args):
    torch.manual_seed(0)
    if args.part == 'rows':
        return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=args.vocab, n_positions=args.seq_len, n_embd=args.emb, n_layer=2, n_head=4,
                                              pad_token_id=0))
    cfg = T.LlamaConfig(vocab_size=args.vocab, hidden_size=args.emb, intermediate_size=2 * args.emb, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=args.seq_len, tie_word_embeddings=False,
                        pad_token_id=0)
    return T.LlamaForCausalLM(cfg).to(torch.bfloat16)

def trainer(variant, args, clock):
    "A Trainer for `variant`, its model on `args.device`"
    import peft
    m, items, cbs, loss = model_of(args), data(args), [clock], None
    rows = list(range(args.vocab - args.rows, args.vocab))  # the newest tokens
    if args.part == 'rows':
        for p in m.parameters(): p.requires_grad_(False)
        if variant == ROWS[0]: m = peft.get_peft_model(m, peft.TrainableTokensConfig(target_modules=['wte'], token_indices=rows))
        elif variant == ROWS[3]: m.transformer.wte.weight.requires_grad_(True)
        else: train_rows(m, rows, {k: torch.stack([i[k] for i in items[:2]]) for k in items[0]})
    if variant in ROWS[1:3] + LOSS[1:]:
        cb = PadGuardCallback(fused=variant == LOSS[3]); cbs.append(cb)
        if variant in (ROWS[2], LOSS[2], LOSS[3]): loss = cb.loss
    a = T.TrainingArguments(str(Path(args.out)/variant.replace(' ', '_')), max_steps=args.steps, per_device_train_batch_size=args.bs,
                            learning_rate=1e-3, weight_decay=0.01, report_to=[], save_strategy='no', logging_strategy='no',
                            disable_tqdm=True, use_cpu=not args.device.startswith('cuda'), seed=0,
                            bf16=args.part == 'loss' and args.device.startswith('cuda'))
    return T.Trainer(m.to(args.device), a, train_dataset=items, callbacks=cbs, compute_loss_func=loss)

def opt_bytes(tr):
    return sum(v.numel() * v.element_size() for st in tr.optimizer.state.values() for v in st.values() if torch.is_tensor(v))

def markdown(res)->str:
    c = res['config']
    what = (f"GPT-2 layout, vocab {c['vocab']}, emb {c['emb']}, 2 layers, tied, {c['rows']} added rows" if c['part'] == 'rows' else
            f"Llama layout in bf16, vocab {c['vocab']}, hidden {c['emb']}, 1 layer, untied")
    first = next(iter(res['variants']))
    lines = [f"`{res['command']}` on {res['device']} ({res['machine']}); {what}, bs {c['bs']} x {c['seq_len']}, {c['reps']} rounds of "
             f"{c['steps']} steps:", '', f"| variant | median step | ratio to {first} | memory growth in a step | vs {first} |"
             + (' optimizer state |' if c['part'] == 'rows' else ''), '|---|---:|---:|---:|---:|' + ('---:|' if c['part'] == 'rows' else '')]
    g0 = res['variants'][first].get('growth_mb')
    for v, d in res['variants'].items():
        t = f"{d['median_s']*1e3:.1f} ms" if d['median_s'] < 1 else f"{d['median_s']:.3f} s"
        g = d.get('growth_mb')
        lines.append(f"| {v} | {t} | {d['ratio']:.3f}x | {'-' if g is None else f'{g:.0f} MB'} | "
                     f"{'-' if g is None or not g0 else f'{g/g0:.2f}x'} |" + (f" {d['opt_bytes']/2**10:.1f} KiB |" if c['part'] == 'rows' else ''))
    return '\n'.join(lines)

def main():
    if len(sys.argv) == 3 and sys.argv[1] == '--table': return print(markdown(json.loads(Path(sys.argv[2]).read_text())))
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--part', choices=['rows', 'loss'], default='rows'); p.add_argument('--device', default='cpu')
    p.add_argument('--vocab', type=int, default=None); p.add_argument('--emb', type=int, default=None); p.add_argument('--rows', type=int, default=16)
    p.add_argument('--bs', type=int, default=None); p.add_argument('--seq-len', type=int, default=None)
    p.add_argument('--reps', type=int, default=5); p.add_argument('--steps', type=int, default=3)
    p.add_argument('--quick', action='store_true'); p.add_argument('--json', default=None); p.add_argument('--no-memory', action='store_true')
    p.add_argument('--out', default='/tmp/padguard-bench-hf'); p.add_argument('--_memory', default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    dflt = dict(rows=(50000, 256, 8, 64), loss=(128000, 64, 4, 256))[args.part]
    for k, d in zip(('vocab', 'emb', 'bs', 'seq_len'), dflt):
        if getattr(args, k) is None: setattr(args, k, d)
    if args.quick: args.vocab, args.emb, args.bs, args.seq_len, args.reps, args.steps = 300, 16, 2, 16, 1, 2
    cuda, variants = args.device.startswith('cuda'), ROWS if args.part == 'rows' else LOSS
    if args._memory:
        c = StepClock(cuda, memory=True); trainer(args._memory, args, c).train()
        return print(json.dumps({'growth_bytes': max(c.growth[1:] or c.growth) if c.growth else None}))
    clocks = {v: StepClock(cuda) for v in variants}
    trs = {v: trainer(v, args, clocks[v]) for v in variants}
    for v in variants: trs[v].train()  # warm-up
    for c in clocks.values(): c.times = []
    for _ in range(args.reps):
        for v in variants: trs[v].train()
    base = statistics.median(clocks[variants[0]].times)
    import peft
    res = {'machine': f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, transformers {T.__version__}, "
                      f"peft {peft.__version__}", 'device': torch.cuda.get_device_name() if cuda else args.device,
           'config': {k: getattr(args, k) for k in ('part', 'vocab', 'emb', 'rows', 'bs', 'seq_len', 'reps', 'steps', 'quick')},
           'command': 'python bench/hf.py ' + ' '.join(sys.argv[1:]), 'variants': {}}
    for v in variants:
        med = statistics.median(clocks[v].times)
        res['variants'][v] = {'median_s': med, 'ratio': med / base, 'n': len(clocks[v].times)}
        if args.part == 'rows': res['variants'][v]['opt_bytes'] = opt_bytes(trs[v])
        if not args.no_memory:
            cmd = [sys.executable, __file__, '--_memory', v] + [a for a in sys.argv[1:] if a != '--no-memory']
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            g = json.loads(out.strip().splitlines()[-1])['growth_bytes']
            res['variants'][v]['growth_mb'] = None if g is None else g / 2**20
    print(markdown(res))
    if args.json: Path(args.json).write_text(json.dumps(res, indent=1))

if __name__ == '__main__': main()
