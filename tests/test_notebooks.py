"""The notebooks are the docs and their examples are tests. Quarto can't be installed here, so this is the docs check:
nbdev-test runs every notebook; nbdev-proc-nbs turns the committed notebooks into what nbdev publishes (_proc/: hidden
cells dropped, directives removed, a show_doc card with its parameter table for each exported name), and that is
checked and rendered to HTML (set PADGUARD_HTML_OUT=some/dir to keep the pages and look at them in a browser)."""
import json, os, re, shutil, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
NBS = sorted(p.name for p in (ROOT/'nbs').glob('*.ipynb'))
nbdev = pytest.importorskip('nbdev', reason="nbdev 3 can't be installed beside fastai 2.7 (it needs fastcore >= 2.1.3)")

def _copy_repo(dst):
    shutil.copytree(ROOT, dst, ignore=shutil.ignore_patterns('.venv', '.nox', '.git', '.whl', '_docs', '_proc', '*.egg-info', '__pycache__', 'models'))
    return dst

def _cells(path): return json.loads(Path(path).read_text())['cells']
def _outputs(cell): return cell.get('outputs', [])
def _text(o): return ''.join(o.get('text', '')) + ''.join(''.join(v) for k,v in o.get('data', {}).items() if k.startswith('text/'))

@pytest.fixture(scope='module')
def executed(tmp_path_factory):
    "A copy of the repo whose notebooks nbdev-test has run from scratch"
    cp = _copy_repo(tmp_path_factory.mktemp('nbs')/'repo')
    r = subprocess.run([str(BIN/'nbdev-test'), '--n-workers', '2'], cwd=cp, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert 'Success' in r.stdout
    return cp

def test_every_notebook_runs(executed):
    assert len(list((executed/'nbs').glob('*.ipynb'))) == len(NBS) >= 12

@pytest.fixture(scope='module')
def proc(tmp_path_factory):
    "nbdev-proc-nbs on a copy of the committed notebooks: the pages nbdev publishes (it fails to install Quarto first, then writes _proc/)"
    cp = _copy_repo(tmp_path_factory.mktemp('proc')/'repo')
    subprocess.run([str(BIN/'nbdev-proc-nbs')], cwd=cp, capture_output=True, text=True, timeout=900)
    return cp/'_proc'

def test_proc_writes_every_page(proc):
    for n in NBS: assert (proc/n).exists(), f"nbdev-proc-nbs wrote no page for {n}"

@pytest.mark.parametrize('name', NBS)
def test_published_page_is_clean(proc, name):
    "No traceback or error output, no directive or hidden cell left, code lines that fit the page"
    cells = _cells(proc/name)
    for c in cells:
        src = ''.join(c['source'])
        assert not re.search(r'^#\|\s*(hide|export|default_exp)', src, re.M), f"{name}: a directive was published:\n{src[:200]}"
        for o in _outputs(c):
            assert o.get('output_type') != 'error' and 'Traceback (most recent call last)' not in _text(o), f"{name}: error output:\n{_text(o)[:500]}"
        if c['cell_type'] == 'code' and 'show_doc(' not in src:
            long = [l for l in src.splitlines() if len(l) > 100]
            assert not long, f"{name}: code line of {len(long[0])} characters is cut off on the page: {long[0][:80]}..."

def _page_of(name):
    "The page (notebook) that documents public name `name`"
    import fastai_padguard.all as a
    mod = getattr(a, name).__module__.split('.')[-1]
    for n in NBS:
        if re.search(rf'#\|\s*default_exp\s+{mod}\b', (ROOT/'nbs'/n).read_text()): return n

def test_every_public_name_has_a_parameter_table(proc):
    "Each name `fastai_padguard.all` exports has a show_doc card on its page, with a table of its documented arguments"
    import fastai_padguard.all as a, inspect
    for name in a.__all__:
        page = _page_of(name)
        shown = getattr(a, name).__qualname__ if '.' in getattr(a, name).__qualname__ else name  # @patch: Learner.padguard
        cards = [_text(o) for c in _cells(proc/page) if ''.join(c['source']).strip().endswith(f'show_doc({shown})') for o in _outputs(c)]
        assert cards, f"{name}: no show_doc card on {page}"
        params = [p for p in inspect.signature(getattr(a, name)).parameters if p not in ('self', 'args', 'kwargs')]
        if params:
            assert '| **Details** |' in cards[0], f"{name}: its card has no parameter table (docments missing?)\n{cards[0][:400]}"
            assert 'NoneType' not in cards[0], f"{name}: an argument is typed NoneType on its card: annotate it"
            for p in params: assert f'| {p} |' in cards[0], f"{name}: argument {p} has no row in the table"

def test_stored_outputs_read_without_running():
    "index (README), the tutorial and the models page are committed with outputs, the tutorial with its plot"
    for n in ['index.ipynb', '07_tutorial.ipynb', '09_models.ipynb']:
        cs = [c for c in _cells(ROOT/'nbs'/n) if c['cell_type'] == 'code']
        assert sum(bool(_outputs(c)) for c in cs) >= 3, f"{n} is committed without its outputs: run nbdev-test --save"
    assert any('image/png' in o.get('data', {}) for c in _cells(ROOT/'nbs'/'07_tutorial.ipynb') for o in _outputs(c))

# Quarto wraps long output lines at spaces; Jupyter's stylesheet breaks them anywhere (`pad` / `ding_idx`): the stand-in does as Quarto
OUTPUT_CSS = '<style>.jp-OutputArea-output pre, .jp-RenderedText pre {word-break: normal; overflow-wrap: break-word}</style>'

def _as_quarto(nb):
    "What Quarto does with a page that nbconvert does not: the front matter becomes the title and description, hidden sources hidden"
    import nbformat, yaml
    cells = []
    for c in nb.cells:
        if c.cell_type == 'raw' and c.source.lstrip().startswith('---'):
            fm = yaml.safe_load(c.source.strip().strip('-'))
            c = nbformat.v4.new_markdown_cell(f"# {fm['title']}" + (f"\n\n> {fm['description']}" if fm.get('description') else ''))
        c.metadata.pop('execution', None)
        if c.cell_type == 'code' and '#| echo: false' in c.source: c.metadata['transient'] = {'remove_source': True}
        cells.append(c)
    nb.cells = cells
    return nb

def test_docs_render_to_html(proc):
    "The published pages render to HTML (nbconvert stands in for Quarto): a title, no raw front matter, the tutorial's plot"
    import nbformat
    from nbconvert import HTMLExporter
    out = Path(os.environ.get('PADGUARD_HTML_OUT', proc.parent/'html')); out.mkdir(parents=True, exist_ok=True)
    for n in NBS:
        title = _cells(ROOT/'nbs'/n)[0]['source'][0].lstrip('# ').strip()
        nb = _as_quarto(nbformat.read(proc/n, as_version=4))
        html, _ = HTMLExporter().from_notebook_node(nb)
        html = html.replace('</head>', OUTPUT_CSS + '</head>', 1)
        (out/n.replace('.ipynb', '.html')).write_text(html)
        assert 'Traceback' not in html, n
        assert re.search(rf'<h1[^>]*>{re.escape(title)}', html), f"{n}: no title {title!r} on the page"
        assert 'output-file:' not in html and not re.search(r'^---$', html, re.M), f"{n}: raw front matter on the page"
    assert re.search(r'<img[^>]+src="data:image/png;base64,', (out/'07_tutorial.html').read_text())

@pytest.mark.parametrize('name', NBS)
def test_no_progress_bar_in_stored_outputs(name):
    "fastai's text progress bar (a stray bar from a fit without no_bar) and warnings on stderr are never left in a page; its epoch table may be"
    for c in _cells(ROOT/'nbs'/name):
        for o in _outputs(c):
            assert o.get('name') != 'stderr', f"{name} {c.get('id')}: stderr stored on the page:\n{_text(o)[:200]}"
            t = _text(o) if o.get('output_type') == 'stream' else ''.join(o.get('data', {}).get('text/plain', ''))
            assert not re.search(r'\|-{10,}\||█|\d+\.\d+% \[\d+/\d+', t), f"{name} {c.get('id')}: a progress bar is stored:\n{t[:200]}"

@pytest.mark.parametrize('name', NBS)
def test_valid_for_plain_nbconvert(name):
    "Each committed notebook is valid nbformat, as plain `jupyter nbconvert` requires"
    import nbformat
    nbformat.validate(nbformat.read(ROOT/'nbs'/name, as_version=4))

def test_quarto_config_lists_every_notebook():
    yml = (ROOT/'nbs'/'sidebar.yml').read_text()
    assert (ROOT/'nbs'/'_quarto.yml').exists()
    for n in NBS: assert n in yml, n

def test_library_matches_notebooks(tmp_path):
    "nbdev-export on a copy changes nothing: fastai_padguard/ was exported from nbs/"
    cp = _copy_repo(tmp_path/'repo')
    subprocess.run([str(BIN/'nbdev-export')], cwd=cp, check=True, capture_output=True)
    for f in (ROOT/'fastai_padguard').glob('*.py'):
        assert (cp/'fastai_padguard'/f.name).read_text() == f.read_text(), f"{f.name} differs from its notebook: run nbdev-export"
