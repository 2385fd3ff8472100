"""The notebooks are the docs and their examples are tests. Quarto can't be installed here, so this is the docs check:
run every notebook with nbdev-test (on a copy, saving outputs), render the tutorial and API notebooks to HTML with
nbconvert, and check what a reader gets."""
import os, re, shutil, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
API = ['01_core', '02_losses', '03_learner', '04_diagnostics', '05_compat']
BIN = Path(sys.executable).parent

def _copy_repo(dst):
    shutil.copytree(ROOT, dst, ignore=shutil.ignore_patterns('.venv', '.git', '_docs', '_proc', '*.egg-info', '__pycache__', 'models'))
    return dst

@pytest.fixture(scope='module')
def executed(tmp_path_factory):
    "A copy of the repo whose notebooks nbdev-test has run, outputs saved"
    cp = _copy_repo(tmp_path_factory.mktemp('nbs')/'repo')
    r = subprocess.run([str(BIN/'nbdev-test'), '--n-workers', '2', '--save'], cwd=cp, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert 'Success' in r.stdout
    return cp

def test_every_notebook_runs(executed):
    assert len(list((executed/'nbs').glob('*.ipynb'))) >= 10

def _html(path):
    import nbformat
    from nbconvert import HTMLExporter
    nb = nbformat.read(path, as_version=4)
    for c in nb.cells: c.metadata.pop('execution', None)  # nbdev-test --save records timings that nbformat's schema rejects
    body, _ = HTMLExporter().from_notebook_node(nb)
    return body

def test_docs_render_to_html(executed):
    out = Path(os.environ.get('PADGUARD_HTML_OUT', executed/'html')); out.mkdir(parents=True, exist_ok=True)
    for name in ['07_tutorial'] + API:
        html = _html(executed/'nbs'/f'{name}.ipynb')
        (out/f'{name}.html').write_text(html)
        assert 'Traceback' not in html, name
    tut = (out/'07_tutorial.html').read_text()
    assert re.search(r'<img[^>]+src="data:image/png;base64,', tut), "the tutorial shows the monitor's plot as an image"
    core = (out/'01_core.html').read_text()
    assert 'Keep the pad row (and `extra_idxs` rows)' in core or 'Keep the pad row (and <code>extra_idxs</code> rows)' in core

def test_stored_tutorial_has_its_plot():
    "The tutorial is committed with its outputs, so it reads on GitHub"
    import nbformat
    nb = nbformat.read(ROOT/'nbs'/'07_tutorial.ipynb', as_version=4)
    assert any('image/png' in o.get('data', {}) for c in nb.cells if c.cell_type=='code' for o in c.outputs)

def test_every_public_name_has_docstring_and_show_doc():
    import fastai_padguard.all as a, nbformat, inspect
    src = ''.join(c.source for f in (ROOT/'nbs').glob('*.ipynb') for c in nbformat.read(f, as_version=4).cells)
    for n in sorted(set(dir(a)) - {'AMINO_ACIDS', 'HYDROPHOBIC', 'FAKE'}):
        o = getattr(a, n)
        if n.startswith('_') or getattr(o, '__module__', '').split('.')[0] != 'fastai_padguard': continue
        assert inspect.getdoc(o), f"{n} has no docstring"
        assert f'show_doc({n})' in src, f"{n} has no show_doc entry"

def test_quarto_config_lists_every_notebook():
    yml = (ROOT/'nbs'/'sidebar.yml').read_text()
    assert (ROOT/'nbs'/'_quarto.yml').exists()
    for f in (ROOT/'nbs').glob('*.ipynb'): assert f.name in yml, f.name

def test_library_matches_notebooks(tmp_path):
    "nbdev-export on a copy changes nothing: fastai_padguard/ was exported from nbs/"
    cp = _copy_repo(tmp_path/'repo')
    subprocess.run([str(BIN/'nbdev-export')], cwd=cp, check=True, capture_output=True)
    for f in (ROOT/'fastai_padguard').glob('*.py'):
        assert (cp/'fastai_padguard'/f.name).read_text() == f.read_text(), f"{f.name} differs from its notebook: run nbdev-export"
