"""What a new user runs after README's `pip install .` (no extras): every Python block of README.md in order, then the demo.
Standard library only, so it runs in that bare environment: `.ci/run` calls it from a fresh venv; `tests/test_packaging.py`
calls it too. Run it from outside the checkout, so the installed package is imported, not the source."""
import re, subprocess, sys
from pathlib import Path

README = Path(__file__).resolve().parents[1]/'README.md'

def readme_code(text:str)->str:
    "The Python blocks of a markdown text, joined into one script"
    return '\n'.join(re.findall(r'^```python\n(.*?)^```', text, flags=re.S | re.M))

if __name__ == '__main__':
    import fastai_padguard
    src = Path(fastai_padguard.__file__).resolve()
    if README.parent/'fastai_padguard' in src.parents: sys.exit(f"fastai_padguard was imported from the checkout ({src}), not the installed package")
    exec(compile(readme_code(README.read_text()), str(README), 'exec'), {'__name__': '__readme__'})
    print('README code: ran')
    subprocess.run([sys.executable, '-m', 'fastai_padguard.demo', '--n', '300'], check=True)
    print('demo: ran')
