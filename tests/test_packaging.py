"Package metadata, README and the built wheel (issue: core)"
import configparser, subprocess, sys, venv, re, os
try: import tomllib
except ImportError: import tomli as tomllib  # Python 3.10
from pathlib import Path
import pytest
from fastai_padguard.all import PadGuard

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
    "README.md is the executed nbs/index.ipynb as nbdev publishes it, in markdown (Quarto's nbdev-readme can't run here)"
    from readme import readme
    assert readme() == (ROOT/'README.md').read_text(), "README.md is stale: run `python tests/readme.py`"

def test_ci_runs_readme_commands():
    "`.ci/run` installs and tests exactly as README tells a new user"
    readme, ci = (ROOT/'README.md').read_text(), (ROOT/'.ci'/'run').read_text()
    for cmd in ['pip install -e ".[dev]"', 'python -m pytest']:
        assert cmd in readme and cmd in ci, cmd
    assert 'pip install .' in readme, "the user install"
    assert '.venv-user/bin/pip install -q .' in ci and 'tests/user_run.py' in ci, "CI installs as a user does, without extras"
    assert '../shared' not in readme and 'seed thread' not in readme

def test_imports_without_dev_extras():
    "A user's `pip install .` has none of the dev extras: the library, the demo and the data import without them (accelerate was needed once)"
    block = "import sys; [sys.modules.__setitem__(m, None) for m in ('accelerate', 'transformers', 'peft', 'nbdev', 'nbformat', 'pytest')]; "
    out = subprocess.run([sys.executable, '-c', block + 'import fastai_padguard.all, fastai_padguard.demo, fastai_padguard.data; print("ok")'],
                         capture_output=True, text=True)
    assert out.stdout.strip() == 'ok', out.stderr[-2000:]

def test_readme_code_is_what_user_run_runs():
    "tests/user_run.py runs every Python block of README (the quick start first), which CI runs in a bare venv"
    from user_run import readme_code
    code = readme_code((ROOT/'README.md').read_text())
    assert code.startswith('from fastai.text.all import *') and 'learn.padguard()' in code and 'pad_audit(dls)' in code

def test_padguard_order_follows_distributed_trainer():
    "PadGuard runs right after fastai's DistributedTrainer (whose module needs accelerate, so the order is written as a number)"
    pytest.importorskip('accelerate')
    from fastai.distributed import DistributedTrainer
    assert PadGuard.order == DistributedTrainer.order + 1

def test_github_workflows_are_nbdevs_pinned_to_ci():
    "nbdev's usual workflows: tests on push run exactly .ci/run; docs built by Quarto with nbdev 3's nbdev-docs and deployed"
    wf = ROOT/'.github'/'workflows'
    test, deploy = (wf/'test.yaml').read_text(), (wf/'deploy.yaml').read_text()
    assert 'push' in test and 'bash .ci/run' in test
    assert 'quarto-dev/quarto-actions/setup' in deploy and 'nbdev-docs' in deploy and 'publish_dir: ./_docs' in deploy
    assert 'doc_path = "_docs"' in (ROOT/'pyproject.toml').read_text()

def test_all_exports_only_what_a_user_calls():
    "`from fastai_padguard.all import *` adds exactly the user-facing names; helpers and example data stay in their modules"
    ns = {}
    exec('from fastai_padguard.all import *', ns)
    assert sorted(k for k in ns if k != '__builtins__') == sorted(['PadGuard', 'padguard', 'PadCrossEntropyLossFlat', 'pad_audit',
                                                                  'PadMonitor', 'row_audit', 'init_untrained_rows', 'patch_weight_dropout',
                                                                  'train_rows', 'RowTrainer', 'new_rows', 'added_rows'])
    from fastai.learner import Learner
    assert Learner.padguard is ns['padguard']
    from fastai_padguard.data import protein_lm_dls   # the example data, importable from its module
    from fastai_padguard.rows import find_guarded     # the resolver

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

def test_library_never_imports_transformers():
    "transformers is a test-only dependency: the library tells Hugging Face models by their methods"
    out = subprocess.run([sys.executable, '-c', 'import sys, fastai_padguard.all; print("transformers" in sys.modules)'],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == 'False'

CORE = ['trace', 'rows', 'ce', 'chunked', 'fused', 'ops', 'rowparams']

def test_the_core_needs_no_fastai():
    "The mechanisms import nothing from fastai: they import and run with fastai (and fastcore) blocked"
    import ast
    for m in CORE:
        tree = ast.parse((ROOT/'fastai_padguard'/f'{m}.py').read_text())
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module and n.level == 0]
        assert not [n for n in names if n.split('.')[0] in ('fastai', 'fastcore')], (m, names)
    block = "import sys; [sys.modules.__setitem__(m, None) for m in ('fastai', 'fastcore', 'accelerate', 'transformers', 'peft')]; "
    code = block + ''.join(f'import fastai_padguard.{m}; ' for m in CORE) + 'print("ok")'
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert out.stdout.strip() == 'ok', out.stderr[-2000:]

def test_no_module_is_over_350_lines():
    "Each module holds one idea"
    for f in (ROOT/'fastai_padguard').glob('*.py'):
        if f.name != '_modidx.py': assert len(f.read_text().splitlines()) <= 350, f.name
