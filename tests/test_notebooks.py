"The notebooks are the docs and their examples are tests: run them all with nbdev-test"
import subprocess, sys, shutil
from pathlib import Path
ROOT = Path(__file__).resolve().parents[1]

def test_nbdev_test_runs_every_notebook():
    exe = Path(sys.executable).parent/'nbdev-test'
    r = subprocess.run([str(exe), '--n-workers', '2'], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert 'Success' in r.stdout

def test_library_matches_notebooks(tmp_path):
    "nbdev-export on a copy changes nothing: fastai_padguard/ was exported from nbs/"
    cp = tmp_path/'repo'
    shutil.copytree(ROOT, cp, ignore=shutil.ignore_patterns('.venv', '.git', '_docs', '*.egg-info', '__pycache__'))
    exe = Path(sys.executable).parent/'nbdev-export'
    subprocess.run([str(exe)], cwd=cp, check=True, capture_output=True)
    for f in (ROOT/'fastai_padguard').glob('*.py'):
        assert (cp/'fastai_padguard'/f.name).read_text() == f.read_text(), f"{f.name} differs from its notebook: run nbdev-export"
