import os, warnings, pytest, torch
from contextlib import contextmanager
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

class FirstStep(Callback):
    "Keeps the loss, the loss the model was scored with and every gradient of the first training batch, then ends the fit"
    order = 99
    def __init__(self, n=1): self.n, self.preds = n, []
    def after_loss(self): self.preds.append(type(self.learn.pred))
    def after_backward(self):
        self.n -= 1
        if self.n: return
        self.loss = self.learn.loss_grad.detach().clone()
        self.grads = {k: p.grad.detach().clone() for k,p in self.learn.model.named_parameters() if p.grad is not None}
        raise CancelFitException()

def first_step(learn, n=1, seed=0):
    "`FirstStep` of one fit of `learn` (after `n` backward passes), from RNG seed `seed`: the loss, the gradients, the training preds' types"
    cb = FirstStep(n)
    set_seed(seed, reproducible=True)
    learn.fit(1, 1e-3, cbs=cb)
    return cb

def rel_err(a, b):
    "Largest difference relative to the reference's largest magnitude"
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()

class LargestOutput(TorchDispatchMode):
    "The largest storage (in elements) any op writes while it is on (of outputs whose last axis is `last_dim` long, if given)"
    def __init__(self, last_dim=None): super().__init__(); self.numel, self.last_dim = 0, last_dim
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in (out if isinstance(out, (tuple, list)) else [out]):  # elements stored: a view or an expand holds none of its own
            if isinstance(o, torch.Tensor) and (self.last_dim is None or o.dim() and o.shape[-1] == self.last_dim):
                self.numel = max(self.numel, o.untyped_storage().nbytes() // o.element_size())
        return out

class _EnterEachBatch(Callback):
    order, pred_after_step = CastToTensor.order + 1, False  # after fastai's cast (fastai 2.7's as_subclass fails under a dispatch mode)
    def __init__(self, rec): self.rec = rec
    def before_batch(self): self.rec.__enter__(); self.rec.on = True

class _ExitEachBatch(Callback):
    # after every after_batch (the Recorder's metrics, GatherPredsCallback); on fastai 2.7, before the Recorder's, which makes
    # fastai tensors (its as_subclass fails under a dispatch mode)
    order, pred_after_step = 200 if Version(fastai.__version__) >= Version('2.8') else Recorder.order - 1, False
    def __init__(self, rec): self.rec = rec
    def after_batch(self): self.rec.__exit__(None, None, None); self.rec.on = False

@contextmanager
def largest_in_batches():
    "A `LargestOutput` on for each batch's work (the rows found at a fit's first batch, forward, loss, metrics, step), and its callbacks"
    rec = LargestOutput(); rec.on = False
    try: yield rec, [_EnterEachBatch(rec), _ExitEachBatch(rec)]
    finally:
        if rec.on: rec.__exit__(None, None, None)  # a batch that raised: the mode is not left on for what follows

class NewStorages(TorchDispatchMode):
    "How many new storages of at least `numel` elements ops write while it is on (in-place writes and views are not new)"
    def __init__(self, numel): super().__init__(); self.min, self.n = numel, 0
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        ins = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
        out = func(*args, **kwargs)
        for o in torch.utils._pytree.tree_leaves(out):
            if isinstance(o, torch.Tensor) and o.numel() >= self.min and o.untyped_storage().data_ptr() not in ins: self.n += 1
        return out

class Float64Recorder(Callback):
    "fastai's smoothed loss starts as a float32 tensor, which `torch.lerp` won't mix with a float64 loss: start it in float64"
    order = Recorder.order + 1  # after the Recorder's before_fit resets it
    pred_after_step = False  # it reads no learn.pred (the fused path then keeps no copy of the output layer's weight)
    def before_fit(self): self.learn.recorder.smooth_loss.val = self.learn.recorder.smooth_loss.val.double()

def loop_model(kind:str, seed=0):
    "`(model, batch, pad, causal)`: a tiny random-init model of one family (no dropout) and a batch for it, the model in float64"
    torch.manual_seed(seed)
    n, seq, bs = 40, 10, 4
    ids = torch.randint(3, n - 1, (bs, seq)); ids[:, -3:] = 0  # padded at the end with id 0
    if kind == 'custom': m = NanoGPT(n, seq)
    else:
        import transformers as T
        if kind == 'gpt2': m = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=n, n_positions=16, n_embd=16, n_layer=1, n_head=2, pad_token_id=0,
                                                           resid_pdrop=0., embd_pdrop=0., attn_pdrop=0.))
        elif kind == 'llama':
            m = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=n, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                 num_key_value_heads=1, max_position_embeddings=16, tie_word_embeddings=False, pad_token_id=0))
        elif kind == 'bert-mlm':
            m = T.BertForMaskedLM(T.BertConfig(vocab_size=n, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                               max_position_embeddings=16, pad_token_id=0,
                                               hidden_dropout_prob=0., attention_probs_dropout_prob=0.))
        else: raise ValueError(kind)
    m.double()
    if kind == 'custom': return m, ids, 0, True
    labels = ids.masked_fill(ids == 0, -100)
    if kind == 'bert-mlm':
        masked = torch.rand(ids.shape) < 0.3
        labels = labels.masked_fill(~masked, -100); ids = ids.masked_fill(masked & (ids != 0), 2)  # 2: the mask token here
    return m, {'input_ids': ids, 'attention_mask': (ids != 0).long(), 'labels': labels}, 0, kind != 'bert-mlm'

def trainer_of(model, data, out, callbacks, compute_loss_func=None, **kw):
    "A Hugging Face `Trainer` on CPU, quiet, over a list of dict items: AdamW with weight decay, smoothing, accumulation, by default"
    import transformers as T
    a = dict(max_steps=4, per_device_train_batch_size=2, gradient_accumulation_steps=2, learning_rate=1e-2, weight_decay=0.1,
             label_smoothing_factor=0.1, use_cpu=True, report_to=[], save_strategy='no', logging_steps=1, disable_tqdm=True, seed=0)
    return T.Trainer(model, T.TrainingArguments(str(out), **{**a, **kw}), train_dataset=data, callbacks=callbacks,
                     compute_loss_func=compute_loss_func)

def items_of(batch):
    "A batch (a mapping of tensors) as a list of per-item dicts: a dataset the Trainer's default collator stacks back"
    n = len(next(iter(batch.values())))
    return [{k: v[i] for k, v in batch.items()} for i in range(n)]

def two_processes(script:str, out, *args, env:dict|None=None, cwd=None):
    "Run `tests/script OUT ARGS` on 2 processes (torchrun, gloo, loopback): each rank's saved results `out/rank{i}.pt`"
    import socket, subprocess, sys
    from pathlib import Path
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]
    torchrun = Path(sys.executable).parent/'torchrun'
    env = {**os.environ, 'MASTER_ADDR': '127.0.0.1', 'OMP_NUM_THREADS': '1', **(env or {})}
    r = subprocess.run([str(torchrun), '--nproc_per_node', '2', '--master_addr', '127.0.0.1', '--master_port', str(port),
                        str(Path(__file__).resolve().parent/script), str(out), *args], env=env, capture_output=True, text=True,
                       timeout=600, cwd=cwd)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return [torch.load(Path(out)/f'rank{i}.pt', weights_only=False) for i in (0, 1)]
