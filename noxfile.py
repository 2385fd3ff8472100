"""The supported range, checked: one session per fastai/torch combination, each in a fresh virtual environment.

    nox                     # the default sessions: oldest and newest
    nox -s fastai27_torch26 # one session
    nox -l                  # all of them

The bounds in pyproject.toml are exactly what these sessions install: the package goes in with its own dependency
declaration and the session's pins as constraints, so pip refuses a pin the bounds don't admit.
"""
import sys
from pathlib import Path
import nox

nox.options.sessions = ['oldest', 'newest']
nox.options.reuse_existing_virtualenvs = True
nox.options.default_venv_backend = 'venv'
PY = f'{sys.version_info.major}.{sys.version_info.minor}'
TEST_DEPS = ['pytest', 'transformers', 'accelerate', 'nbformat', 'nbconvert', 'build']

def _suite(session, fastai, torch, *extra):
    "Install the package with fastai and torch pinned, then run the whole suite"
    Path('.nox').mkdir(exist_ok=True)
    pins = Path('.nox')/f'pins-{session.name}.txt'
    pins.write_text(f'fastai=={fastai}\ntorch=={torch}\n' + ''.join(f'{e}\n' for e in extra))
    session.install('-c', str(pins), '.', f'fastai=={fastai}', f'torch=={torch}', *TEST_DEPS)
    session.run('python', '-c', 'import fastai, torch, fastai_padguard; print("fastai", fastai.__version__, "torch", torch.__version__)')
    session.run('python', '-m', 'pytest', '-q', '-p', 'no:cacheprovider', *session.posargs)

@nox.session(python=PY)
def oldest(session):
    "The oldest combination admitted: fastai 2.7.19 and torch 2.3.1 (nbdev can't live beside fastai 2.7: notebook tests skip)"
    _suite(session, '2.7.19', '2.3.1', 'torchvision==0.18.1', 'numpy<2', 'transformers<5')

@nox.session(python=PY)
def fastai27_torch26(session):
    "fastai 2.7.19 with torch 2.6, where torch.load's weights_only default changed"
    _suite(session, '2.7.19', '2.6.0', 'torchvision==0.21.0')

@nox.session(python=PY)
def newest(session):
    "The newest fastai 2.8 with the newest torch pip gives this machine, and nbdev 3 (the notebook tests run)"
    Path('.nox').mkdir(exist_ok=True)
    session.install('.[dev]', 'fastai>=2.8', 'torch', 'transformers')
    session.run('python', '-c', 'import fastai, torch, fastai_padguard; print("fastai", fastai.__version__, "torch", torch.__version__)')
    session.run('python', '-m', 'pytest', '-q', '-p', 'no:cacheprovider', *session.posargs)

@nox.session(python=PY)
def readme(session):
    "README's user install in a fresh environment (no extras), then every python block of README and the demo: what CI runs first"
    session.install('.')
    session.chdir(session.create_tmp())  # import the installed package, not the checkout
    session.run('python', str(Path(__file__).parent/'tests'/'user_run.py'))
