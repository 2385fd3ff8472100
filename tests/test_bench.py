"The benchmark script runs and emits valid JSON (a smoke test: it checks nothing about speed)"
import json, subprocess, sys
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

def test_loss_bench_runs():
    out = subprocess.run([sys.executable, str(ROOT/'bench'/'loss.py'), '--n', '64', '--vocab', '500', '--emb', '16', '--reps', '2'],
                         check=True, capture_output=True, text=True, timeout=300).stdout
    assert 'PadCrossEntropyLossFlat' in out and 'copy_ into an existing one' in out

import pytest
@pytest.mark.parametrize('saved', ['results.json', 'results-cuda.json', 'results-cuda-250k.json'])
def test_readme_table_is_the_saved_run(saved):
    "The cost tables (bench/README.md) are `bench/step.py --table bench/<saved run>`, so the figures come from runs anyone can repeat"
    table = subprocess.run([sys.executable, str(ROOT/'bench'/'step.py'), '--table', str(ROOT/'bench'/saved)],
                           check=True, capture_output=True, text=True).stdout.strip()
    assert table in (ROOT/'bench'/'README.md').read_text()

def test_resolve_bench_runs():
    out = subprocess.run([sys.executable, str(ROOT/'bench'/'resolve.py'), '--reps', '2'], check=True, capture_output=True, text=True, timeout=300).stdout
    assert 'resolve(), batch drawn from the data' in out
