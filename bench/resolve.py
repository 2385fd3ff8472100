"""What finding the rows costs: `learn.pad_guard.resolve()` on README's quick-start model (a small tied AWD-LSTM on
generated protein sequences), with a batch drawn from the data and from a given batch; median of `--reps`.

    python bench/resolve.py [--reps 10]
"""
import argparse, random, statistics, time, warnings
warnings.filterwarnings('ignore')
from fastai.text.all import *
from fastai_padguard.all import *
from fastai_padguard.data import CharTokenizer

def main():
    p = argparse.ArgumentParser(); p.add_argument('--reps', type=int, default=10); a = p.parse_args()
    random.seed(0)
    AA = 'ACDEFGHIKLMNPQRSTVWY'
    df = pd.DataFrame({'text': [''.join(random.choices(AA, k=random.randint(20, 60))) for _ in range(400)]})
    block = TextBlock.from_df('text', is_lm=True, tok=CharTokenizer(), rules=[], n_workers=0)
    dls = DataBlock(blocks=block, get_x=ColReader('text'),
                    splitter=RandomSplitter(seed=0)).dataloaders(df, bs=16, seq_len=16, num_workers=0)
    learn = language_model_learner(dls, AWD_LSTM, pretrained=False, wd=0.1,
                                   config=awd_lstm_lm_config | dict(emb_sz=32, n_hid=64, n_layers=2))
    t = time.perf_counter(); learn.padguard(); first = time.perf_counter() - t
    def timed(f):
        ts = []
        for _ in range(a.reps):
            t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
        return statistics.median(ts)
    b = dls.one_batch()
    drawn, given = timed(learn.pad_guard.resolve), timed(lambda: learn.pad_guard.resolve((b[:1], b[1:])))
    print(f"padguard(): {first*1e3:.1f} ms; resolve(), batch drawn from the data: {drawn*1e3:.1f} ms; "
          f"from a given batch: {given*1e3:.1f} ms (median of {a.reps}, {torch.get_num_threads()} threads)")

if __name__ == '__main__': main()
