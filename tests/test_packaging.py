"Package metadata, README and the built wheel (issue: core)"
import configparser, subprocess, sys, venv, re, os
try: import tomllib
except ImportError: import tomli as tomllib  # Python 3.10
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
def pyproject(): return tomllib.loads((ROOT/'pyproject.toml').read_text())
def settings(): 
    cp = configparser.ConfigParser(); cp.read(ROOT/'settings.ini'); return cp['DEFAULT']

def test_settings_ini_agrees_with_pyproject():
    "nbdev 3 reads only pyproject.toml; settings.ini (nbdev 2 format) must say the same"
    import fastai_padguard
    proj, s = pyproject()['project'], settings()
    assert s['lib_name'] == proj['name'] == 'fastai-padguard'
    assert s['lib_path'] == 'fastai_padguard'
    assert s['version'] == fastai_padguard.__version__
    assert s['description'] == proj['description']
    assert '>=' + s['min_python'] == proj['requires-python']
    assert s['requirements'].split() == proj['dependencies']
    assert s['dev_requirements'].split() == proj['optional-dependencies']['dev']
    assert 'nbdev' in pyproject()['tool']

def test_version_is_single_sourced():
    assert pyproject()['tool']['setuptools']['dynamic']['version'] == {'attr': 'fastai_padguard.__version__'}

def test_readme_is_index_notebook():
    "README.md is nbs/index.ipynb as markdown (Quarto's nbdev-readme can't run here)"
    out = subprocess.run([sys.executable, '-m', 'nbconvert', '--to', 'markdown', '--stdout', str(ROOT/'nbs'/'index.ipynb')],
                         capture_output=True, text=True, check=True).stdout
    assert out == (ROOT/'README.md').read_text(), \
        "README.md is stale: run `jupyter nbconvert --to markdown --stdout nbs/index.ipynb > README.md`"

def test_ci_runs_readme_commands():
    "`.ci/run` installs and tests exactly as README tells a new user"
    readme, ci = (ROOT/'README.md').read_text(), (ROOT/'.ci'/'run').read_text()
    for cmd in ['pip install -e ".[dev]"', 'python -m pytest']:
        assert cmd in readme and cmd in ci, cmd

def test_all_exports_public_api():
    import fastai_padguard.all as a
    for n in ['PadGuard', 'padguard', 'PadCrossEntropyLossFlat', 'patch_weight_dropout', 'protein_lm_dls']:
        assert hasattr(a, n), n
    from fastai.learner import Learner
    assert Learner.padguard is a.padguard

@pytest.mark.slow
def test_wheel_builds_installs_and_imports(tmp_path):
    "python -m build makes a wheel that installs in a fresh venv and imports from there, not from this checkout"
    subprocess.run([sys.executable, '-m', 'build', '--wheel', '--outdir', str(tmp_path/'dist'), str(ROOT)], check=True,
                   capture_output=True)
    whl, = (tmp_path/'dist').glob('fastai_padguard-*.whl')
    env = tmp_path/'env'
    venv.create(env, with_pip=True)
    py = env/'bin'/'python'
    subprocess.run([str(py), '-m', 'pip', 'install', '-q', '--no-deps', str(whl)], check=True, capture_output=True)
    # dependencies (fastai, torch: several GB) come from this environment's site-packages, appended after the venv's own
    site = next(p for p in sys.path if p.endswith('site-packages'))
    venv_site, = (env/'lib').glob('python*/site-packages')
    (venv_site/'deps.pth').write_text(site+'\n')
    out = subprocess.run([str(py), '-c', 'import fastai_padguard, fastai_padguard.all as a; print(fastai_padguard.__file__, fastai_padguard.__version__, a.PadGuard)'],
                         check=True, capture_output=True, text=True, cwd=tmp_path).stdout
    assert str(venv_site) in out and 'PadGuard' in out
