"The benchmark script runs and emits valid JSON (a smoke test: it checks nothing about speed)"
import json, subprocess, sys
import pytest
from pathlib import Path
ROOT = Path(__file__).resolve().parents[1]

def test_bench_quick_emits_json(tmp_path):
    out = tmp_path/'r.json'
    subprocess.run([sys.executable, str(ROOT/'bench'/'step.py'), '--quick', '--json', str(out)], check=True, capture_output=True, timeout=300)
    res = json.loads(out.read_text())
    assert list(res['variants']) == ['plain fastai', 'PadGuard alone', 'padguard() (guard + loss)', 'workaround: grad hook', 'workaround: masked logits']
    for d in res['variants'].values():
        assert d['median_s'] > 0 and d['n'] > 0 and d['peak_mb'] > 0
    assert res['variants']['plain fastai']['ratio'] == 1.0
    table = subprocess.run([sys.executable, str(ROOT/'bench'/'step.py'), '--table', str(out)], check=True, capture_output=True, text=True).stdout
    assert '| padguard() (guard + loss) |' in table

def test_fused_bench_quick(tmp_path):
    "--fused: plain fastai, padguard(fused=False), padguard() (fused), torch's F.linear_cross_entropy and the floor, with memory growth"
    out = tmp_path/'f.json'
    subprocess.run([sys.executable, str(ROOT/'bench'/'step.py'), '--quick', '--fused', '--json', str(out)], check=True, capture_output=True, timeout=300)
    res = json.loads(out.read_text())
    import torch.nn.functional as F
    expect = ['plain fastai', 'padguard(fused=False)', 'padguard() (guard + loss)'] + (['peer: torch F.linear_cross_entropy'] if hasattr(F, 'linear_cross_entropy') else [])
    assert list(res['variants']) == expect + ['floor: no output layer, no loss']
    assert all('growth_mb' in d and 'fwd_bwd_mb' in d for d in res['variants'].values())

def test_rows_bench_quick(tmp_path):
    pytest.importorskip('peft')
    out = tmp_path/'r.json'
    subprocess.run([sys.executable, str(ROOT/'bench'/'rows.py'), '--quick', '--json', str(out)], check=True, capture_output=True, timeout=300, cwd=ROOT)
    res = json.loads(out.read_text())
    assert list(res['variants'])[1] == 'train_rows (ours)' and all(d['median_s'] > 0 for d in res['variants'].values())

def test_loss_bench_runs():
    out = subprocess.run([sys.executable, str(ROOT/'bench'/'loss.py'), '--n', '64', '--vocab', '500', '--emb', '16', '--reps', '2'],
                         check=True, capture_output=True, text=True, timeout=300).stdout
    assert 'PadCrossEntropyLossFlat' in out and 'fused: padguard() default' in out and 'copy_ into an existing one' in out

@pytest.mark.parametrize('saved', ['results.json', 'results-cuda.json', 'results-cuda-250k.json', 'results-fused.json', 'results-fused-250k.json',
                                   'results-fused-small.json', 'results-fused-small-250k.json'])
def test_readme_table_is_the_saved_run(saved):
    "The cost tables (bench/README.md) are `bench/step.py --table bench/<saved run>`, so the figures come from runs anyone can repeat"
    table = subprocess.run([sys.executable, str(ROOT/'bench'/'step.py'), '--table', str(ROOT/'bench'/saved)],
                           check=True, capture_output=True, text=True).stdout.strip()
    assert table in (ROOT/'bench'/'README.md').read_text()

def test_rows_table_is_the_saved_run():
    table = subprocess.run([sys.executable, str(ROOT/'bench'/'rows.py'), '--table', str(ROOT/'bench'/'results-rows.json')],
                           check=True, capture_output=True, text=True, cwd=ROOT).stdout.strip()
    assert table in (ROOT/'bench'/'README.md').read_text()

def test_resolve_bench_runs():
    out = subprocess.run([sys.executable, str(ROOT/'bench'/'resolve.py'), '--reps', '2'], check=True, capture_output=True, text=True, timeout=300).stdout
    assert 'resolve(), batch drawn from the data' in out

def test_fit_bench_quick(tmp_path):
    "bench/fit.py: a whole fit of plain fastai, padguard(fused=False) and padguard(), timed, with each one's peak growth"
    out = tmp_path/'fit.json'
    subprocess.run([sys.executable, str(ROOT/'bench'/'fit.py'), '--quick', '--json', str(out)], check=True, capture_output=True, timeout=300)
    res = json.loads(out.read_text())
    assert list(res['variants']) == ['plain fastai', 'padguard(fused=False)', 'padguard()']
    assert all(d['median_s'] > 0 and 'growth_mb' in d for d in res['variants'].values())
    vl = [d['valid_loss'] for d in res['variants'].values()]
    assert abs(vl[1] - vl[2]) <= 1e-5 * abs(vl[1]), "fused and unfused validate alike"

@pytest.mark.parametrize('saved', ['results-fit.json', 'results-fit-250k.json'])
def test_fit_table_is_the_saved_run(saved):
    table = subprocess.run([sys.executable, str(ROOT/'bench'/'fit.py'), '--table', str(ROOT/'bench'/saved)],
                           check=True, capture_output=True, text=True).stdout.strip()
    assert table in (ROOT/'bench'/'README.md').read_text()

@pytest.mark.slow
def test_fsdp_bench_quick(tmp_path):
    "bench/fsdp.py --quick: DDP and FSDP2 on 2 processes (gloo); FSDP2 holds half the weights, gradients and optimizer state a rank"
    if not hasattr(__import__('torch.distributed.fsdp', fromlist=['x']), 'fully_shard'): pytest.skip('torch.distributed.fsdp.fully_shard: torch >= 2.6')
    out = tmp_path/'r.json'
    subprocess.run([sys.executable, str(ROOT/'bench'/'fsdp.py'), '--quick', '--json', str(out)], check=True, capture_output=True, timeout=300)
    res = json.loads(out.read_text())['results']
    ddp, fsdp = res['DDP, padguard()'], res['FSDP2, padguard()']
    assert abs(fsdp['state_mb'] / ddp['state_mb'] - 0.5) < 0.05

def test_fsdp_table_is_the_saved_run():
    table = subprocess.run([sys.executable, str(ROOT/'bench'/'fsdp.py'), '--table', str(ROOT/'bench'/'results-fsdp.json')],
                           check=True, capture_output=True, text=True).stdout.strip()
    assert table in (ROOT/'bench'/'README.md').read_text()

def test_hf_bench_quick(tmp_path):
    "bench/hf.py: both parts run inside the Trainer and emit their variants (a smoke test: nothing about speed)"
    pytest.importorskip('peft'); pytest.importorskip('transformers')
    for part, first in (('rows', 'PEFT TrainableTokens'), ('loss', "HF's default loss")):
        out = tmp_path/f'{part}.json'
        subprocess.run([sys.executable, str(ROOT/'bench'/'hf.py'), '--part', part, '--quick', '--no-memory', '--out', str(tmp_path/part),
                        '--json', str(out)], check=True, capture_output=True, timeout=300, cwd=ROOT)
        res = json.loads(out.read_text())
        assert list(res['variants'])[0] == first and all(d['median_s'] > 0 for d in res['variants'].values())

@pytest.mark.parametrize('saved', ['results-hf-rows.json', 'results-hf-loss.json', 'results-hf-loss-250k.json'])
def test_hf_tables_are_the_saved_runs(saved):
    pytest.importorskip('transformers')
    table = subprocess.run([sys.executable, str(ROOT/'bench'/'hf.py'), '--table', str(ROOT/'bench'/saved)],
                           check=True, capture_output=True, text=True, cwd=ROOT).stdout.strip()
    assert table in (ROOT/'bench'/'README.md').read_text()
