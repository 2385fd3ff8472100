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

def quiet(learn):
    "No progress bar, no logging: what the tests train with"
    learn.remove_cbs(learn.cbs.filter(lambda c: isinstance(c, ProgressCallback))); learn.logger = noop
    return learn

def lm_dls_of(letters:str, n=300, bs=16, seq_len=16):
    "Language-model DataLoaders over generated sequences written with `letters` only: fewer letters, more 'xxfake' rows in a vocab of 32"
    from fastai_padguard.data import protein_seqs, CharTokenizer
    AA = 'ACDEFGHIKLMNPQRSTVWY'
    seqs = [''.join(letters[AA.index(c) % len(letters)] for c in s) for s in protein_seqs(n)]
    df = pd.DataFrame({'text': seqs, 'is_valid': np.arange(n) >= int(n*.8)})
    tb = TextBlock.from_df('text', is_lm=True, seq_len=seq_len, tok=CharTokenizer(), rules=[], n_workers=0, min_freq=1)
    return DataBlock(blocks=tb, get_x=ColReader('text'), splitter=ColSplitter('is_valid')).dataloaders(df, bs=bs, seq_len=seq_len, num_workers=0)

def ids_dls(n_tok, pad, n=96, seq=12, lo=3, label=None, seed=0, mask_id=None, device=None):
    "Generated padded batches: LM (x, next token) pairs, (x, label) with `label` classes, or masked-LM pairs when `mask_id` is set"
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(lo, n_tok, (n, seq+1), generator=g)
    lens = torch.randint(seq//2, seq+2, (n,), generator=g)
    for i,l in enumerate(lens): x[i, l:] = pad
    if label is not None: ds = [(x[i,:-1], torch.randint(0, label, (), generator=g)) for i in range(n)]
    elif mask_id is not None:
        y = x[:, :-1].clone(); xm = x[:, :-1].clone()
        m = (torch.rand(y.shape, generator=g) < .3) & (y != pad)
        xm[m] = mask_id; y[~m] = -100
        ds = [(xm[i], y[i]) for i in range(n)]
    else:
        y = x[:, 1:].clone(); y[y == pad] = -100
        ds = [(x[i,:-1], y[i]) for i in range(n)]
    return DataLoaders.from_dsets(ds[:80], ds[80:], bs=16, device=device)

def params_of(model): return {n: p.detach().clone() for n,p in model.named_parameters()}

class HFLogits(Callback):
    "What fastai's transformers tutorial does: keep the logits of a Hugging Face output"
    def after_pred(self): self.learn.pred = self.pred.logits

from torch.utils._python_dispatch import TorchDispatchMode
class RecordOps(TorchDispatchMode):
    "Records the name of every aten op run inside it: a host-device sync shows up as one of `SYNC_OPS`"
    def __init__(self): super().__init__(); self.ops = []
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))

SYNC_OPS = {'_local_scalar_dense', 'nonzero', 'masked_select', 'item'}

class NanoGPT(nn.Module):
    "nanoGPT's layout: token table `wte`, position table `wpe` (here as many rows as the vocab), tied head"
    def __init__(self, n, block, d=16):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(wte=nn.Embedding(n, d), wpe=nn.Embedding(block, d)))
        self.block = nn.TransformerEncoderLayer(d, 2, 32, dropout=0., batch_first=True)
        self.lm_head = nn.Linear(d, n, bias=False); self.lm_head.weight = self.transformer.wte.weight
    def forward(self, x):
        pos = torch.arange(x.shape[1], device=x.device)
        return self.lm_head(self.block(self.transformer.wte(x) + self.transformer.wpe(pos)))
