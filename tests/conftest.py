import os, warnings, pytest, torch
warnings.filterwarnings('ignore', category=FutureWarning)
import fastai
from packaging.version import Version
if Version(fastai.__version__) < Version('2.8') and Version(torch.__version__.split('+')[0]) >= Version('2.6'):
    # fastai 2.7 saves checkpoints (and lr_find's) with pickled fastai objects that torch >= 2.6's weights_only default refuses;
    # this is how a user of fastai 2.7 loads checkpoints they trust (README: supported versions). fastai 2.8 needs nothing.
    os.environ.setdefault('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', '1')
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
from fastai.text.all import *
from fastai_padguard.all import *
from fastai_padguard.data import *

@pytest.fixture(scope='session')
def lm_dls(): return protein_lm_dls(n=300, bs=16, seq_len=16)

@pytest.fixture
def lm(lm_dls):
    "A fresh tied AWD_LSTM language model learner, quiet"
    def _f(**kwargs):
        set_seed(0, reproducible=True)
        kwargs.setdefault('config', small_lm_config())
        learn = language_model_learner(lm_dls, AWD_LSTM, pretrained=False, **kwargs)
        learn.remove_cb(ProgressCallback)
        learn.logger = noop
        return learn
    return _f

def guarded_rows_of(vocab): return [i for i,t in enumerate(vocab) if t in ('xxpad','xxfake')]

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')

def pytest_pycollect_makeitem(collector, name, obj):
    "Collect only tests defined in the test module itself, not fastcore's `test_eq`/`test_fail` pulled in by star imports"
    if name.startswith('test') and callable(obj) and getattr(obj, '__module__', None) != getattr(collector, 'module', None).__name__: return []
