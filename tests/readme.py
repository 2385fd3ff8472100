"""README.md is nbs/index.ipynb as nbdev would publish it, in markdown: `python tests/readme.py` writes it.
Quarto (and so nbdev-readme) can't be installed here. Hidden cells and `#|` directives are dropped as nbdev drops them;
outputs keep their markdown or plain-text form (a progress bar's HTML means nothing in a README)."""
import sys
from pathlib import Path
import nbformat
from nbconvert import MarkdownExporter

ROOT = Path(__file__).resolve().parents[1]

def readme(nb_path=ROOT/'nbs'/'index.ipynb')->str:
    nb = nbformat.read(nb_path, as_version=4)
    cells = []
    for c in nb.cells:
        lines = c.source.splitlines()
        if c.cell_type == 'code' and any(l.strip() in ('#| hide', '#|hide') for l in lines): continue
        c.source = '\n'.join(l for l in lines if not l.startswith('#|')).strip('\n')
        if c.cell_type == 'code':
            outs = []
            for o in c.outputs:
                if o.output_type == 'stream' and o.name == 'stderr': continue
                if 'data' in o:
                    html, md, plain = (o.data.get(k, '') for k in ('text/html', 'text/markdown', 'text/plain'))
                    if '<progress' in html or plain.startswith('<IPython.core.display'): continue  # a progress bar
                    if 'fastprogress' in html: o.data = {'text/html': html}            # fastai's epoch table
                    elif md and not md.startswith('```'): o.data = {'text/markdown': md}
                    elif plain: o.data = {'text/plain': plain}
                    else: continue
                outs.append(o)
            c.outputs = outs
        cells.append(c)
    nb.cells = cells
    nb.metadata['language_info'] = {'name': 'python'}  # fenced code blocks marked as python
    body, _ = MarkdownExporter().from_notebook_node(nb)
    return body

if __name__ == '__main__':
    (ROOT/'README.md').write_text(readme())
    print('wrote', ROOT/'README.md', file=sys.stderr)
