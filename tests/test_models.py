"""The right rows on every model family people bring (issue: models). Each model is built offline from a small config with
random weights, trained a few steps with AdamW and weight decay, and checked bitwise: exactly the intended rows stayed
zero/frozen; position tables, real tokens and classifier heads trained as they would without the guard.
Set PADGUARD_DEVICE=cuda to run them on a GPU."""
import os, warnings
import torch, pytest
from fastai.text.all import *
from fastai_padguard.all import *
from fastai_padguard.data import protein_lm_dls, protein_seqs, CharTokenizer
from fastai_padguard.rows import find_guarded
from conftest import NanoGPT, ids_dls, HFLogits

T = pytest.importorskip('transformers')
DEV = torch.device(os.environ.get('PADGUARD_DEVICE', 'cpu'))

class Wrap(nn.Module):
    "A user's wrapper around an encoder-decoder HF model: (source, decoder input) -> logits"
    def __init__(self, m): super().__init__(); self.m = m
    def forward(self, x):
        src, tgt_in = x
        return self.m(input_ids=src, decoder_input_ids=tgt_in).logits

def token_dls(*args, **kwargs): return ids_dls(*args, device=DEV, **kwargs)
Logits = HFLogits

def seq2seq_dls(src_n, tgt_n, src_pad, tgt_pad, n=96, seq=10, seed=0):
    "((source, decoder input), decoder target) with different vocab sizes"
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(3, src_n, (n, seq), generator=g)
    tgt = torch.randint(3, tgt_n, (n, seq+1), generator=g)
    for i in range(n):
        l = int(torch.randint(seq//2, seq+1, (), generator=g)); src[i, l:] = src_pad; tgt[i, l+1:] = tgt_pad
    y = tgt[:, 1:].clone(); y[y == tgt_pad] = -100
    ds = [((src[i], tgt[i, :-1]), y[i]) for i in range(n)]
    return DataLoaders.from_dsets(ds[:80], ds[80:], bs=16, device=DEV)

def train(learn, n=1):
    learn.remove_cbs(learn.cbs.filter(lambda c: isinstance(c, ProgressCallback))); learn.logger = noop
    learn.model.to(DEV)
    learn.fit(n, 1e-2)

def snapshot(model): return {n: p.detach().clone() for n,p in model.named_parameters()}

def check(learn, before, guarded, mode='zero', untouched=()):
    """`guarded`: {param name: rows} exactly as the guard reports; those rows zero (or frozen) bitwise, every other row of
    those parameters trained; `untouched`: {param name: rows} that must have trained like any other"""
    test_eq(learn.pad_guard.guarded, guarded)
    ps = dict(learn.model.named_parameters(remove_duplicate=False))
    for names, rows in guarded.items():
        n = names.split(' = ')[0]
        w, w0 = ps[n].detach(), before[n].to(ps[n].device)
        r = list(rows)
        expect = torch.zeros_like(w[r]) if mode=='zero' else w0[r]
        assert torch.equal(w[r], expect), f"{n} rows {r} not {mode}"
        others = [i for i in range(w.shape[0]) if i not in rows]
        assert not torch.equal(w[others], w0[others]), f"{n}: the real rows did not train"
        assert (w[others].reshape(len(others), -1).abs().amax(1) > 0).all(), f"{n}: a real row is zero"
    for n, rows in dict(untouched).items():
        w, w0 = ps[n].detach(), before[n].to(ps[n].device)
        for i in rows:
            assert w[i].abs().max() > 0 and not torch.equal(w[i], w0[i]), f"{n} row {i} was guarded or did not train"

def gpt2(tie, n_pos=None):
    cfg = T.GPT2Config(vocab_size=50, n_positions=n_pos or 64, n_embd=16, n_layer=1, n_head=2, tie_word_embeddings=tie,
                       bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    m = T.GPT2LMHeadModel(cfg)
    m.resize_token_embeddings(51)   # add a pad token, as one does for GPT-2
    m.config.pad_token_id = 50
    return m

@pytest.mark.parametrize('tie', [True, False])
@pytest.mark.parametrize('n_pos', [None, 51])
def test_gpt2(tie, n_pos):
    "GPT-2 with a pad added by resize_token_embeddings, tied and untied, also with n_positions == vocab_size"
    m = gpt2(tie, n_pos)
    learn = Learner(token_dls(50, 50), m, loss_func=CrossEntropyLossFlat(), cbs=Logits(), wd=0.1).padguard()
    assert isinstance(learn.loss_func, PadCrossEntropyLossFlat) and learn.loss_func.rows == (50,)
    before = snapshot(m)
    train(learn)
    guarded = {'transformer.wte.weight = lm_head.weight': (50,)} if tie else {'transformer.wte.weight': (50,), 'lm_head.weight': (50,)}
    check(learn, before, guarded, untouched={'transformer.wpe.weight': [0, 1, 50] if n_pos else [0, 1]})
    if not tie: assert m.lm_head.weight is not m.transformer.wte.weight

def test_gpt2_untied_head_drifts_without_guard():
    "Control: without the guard the untied head's pad row moves (weight decay and the softmax)"
    m = gpt2(False)
    learn = Learner(token_dls(50, 50), m, loss_func=CrossEntropyLossFlat(), cbs=Logits(), wd=0.1)
    before = m.lm_head.weight.detach()[50].clone()
    train(learn)
    assert not torch.equal(m.lm_head.weight.detach()[50].cpu(), before.cpu())

def test_gpt2_pad_is_eos_warns():
    m = gpt2(True); m.config.eos_token_id = 50
    learn = Learner(token_dls(50, 50), m, loss_func=CrossEntropyLossFlat(), cbs=Logits())
    with pytest.warns(UserWarning, match='pad_token_id 50 is also the eos_token_id'): learn.padguard()
    assert 'eos_token_id' in repr(learn.pad_guard)

def test_gpt2_without_pad_token_says_how():
    cfg = T.GPT2Config(vocab_size=50, n_positions=64, n_embd=16, n_layer=1, n_head=2)
    learn = Learner(token_dls(50, 49), T.GPT2LMHeadModel(cfg), loss_func=CrossEntropyLossFlat(), cbs=Logits())
    with pytest.raises(ValueError, match='resize_token_embeddings'): learn.padguard()

def test_gpt2_emb_by_name_and_module():
    m = gpt2(True)
    for emb in ['transformer.wte', m.transformer.wte, [m.transformer.wte]]:
        learn = Learner(token_dls(50, 50), m, loss_func=CrossEntropyLossFlat(), cbs=Logits()).padguard(emb=emb)
        test_eq(learn.pad_guard.guarded, {'transformer.wte.weight = lm_head.weight': (50,)})

def test_roberta_mlm_extra_idxs_leave_positions_alone():
    "RoBERTa's position table has padding_idx=1 and as many rows as the vocab: never guarded"
    cfg = T.RobertaConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                          max_position_embeddings=40, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    torch.manual_seed(0)
    m = T.RobertaForMaskedLM(cfg)
    assert m.roberta.embeddings.position_embeddings.padding_idx == 1
    learn = Learner(token_dls(40, 1, lo=5, mask_id=4), m, loss_func=CrossEntropyLossFlat(), cbs=Logits(), wd=0.1).padguard(extra_idxs=[2, 3])
    assert learn.loss_func.rows == (1, 2, 3)
    before = snapshot(m)
    train(learn, 2)
    check(learn, before, {'roberta.embeddings.word_embeddings.weight = lm_head.decoder.weight': (1, 2, 3), 'lm_head.bias = lm_head.decoder.bias': (1, 2, 3)},
          untouched={'roberta.embeddings.position_embeddings.weight': [2, 3]})

def test_distilbert_classifier_head_untouched():
    "A classifier on padded batches: the pad row guarded, its head (as many outputs as tokens) left alone, its loss kept"
    cfg = T.DistilBertConfig(vocab_size=40, dim=16, n_layers=1, n_heads=2, hidden_dim=32, max_position_embeddings=40, num_labels=40, pad_token_id=0)
    torch.manual_seed(0)
    m = T.DistilBertForSequenceClassification(cfg)
    dls = token_dls(40, 0, label=40)
    assert (dls.one_batch()[0] == 0).any(), "the batches are padded"
    learn = Learner(dls, m, loss_func=CrossEntropyLossFlat(), cbs=Logits(), wd=0.1).padguard()
    assert type(learn.loss_func) is CrossEntropyLossFlat
    before = snapshot(m)
    train(learn, 2)
    check(learn, before, {'distilbert.embeddings.word_embeddings.weight': (0,)},
          untouched={'classifier.weight': [0, 1], 'distilbert.embeddings.position_embeddings.weight': [0, 1]})

def test_marian_separate_vocabularies():
    "Marian with its own target vocab (decoder_vocab_size), inside a wrapper module; pad is also the decoder start: freeze"
    from packaging.version import Version
    if Version(T.__version__) < Version('5'):
        pytest.skip("transformers 4.x gives a separate-vocab Marian decoder a copy of the encoder's embedding (vocab_size rows, "
                    "not decoder_vocab_size), so target ids past vocab_size fail in HF's own forward")
    cfg = T.MarianConfig(vocab_size=40, decoder_vocab_size=48, share_encoder_decoder_embeddings=False, d_model=16, encoder_layers=1,
                         decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                         pad_token_id=1, eos_token_id=2, decoder_start_token_id=1, max_position_embeddings=32)
    torch.manual_seed(0)
    m = Wrap(T.MarianMTModel(cfg))
    learn = Learner(seq2seq_dls(40, 48, 1, 1), m, loss_func=CrossEntropyLossFlat(), wd=0.1)
    with pytest.warns(UserWarning, match='decoder_start_token_id'): learn.padguard(mode='freeze')
    before = snapshot(m)
    train(learn, 2)
    check(learn, before, {'m.model.encoder.embed_tokens.weight': (1,), 'm.model.decoder.embed_tokens.weight = m.lm_head.weight': (1,)}, mode='freeze')
    assert learn.loss_func.rows == (1,)

def test_t5():
    cfg = T.T5Config(vocab_size=40, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, pad_token_id=0, decoder_start_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    m = Wrap(T.T5ForConditionalGeneration(cfg))
    learn = Learner(seq2seq_dls(40, 40, 0, 0), m, loss_func=CrossEntropyLossFlat(), wd=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        learn.padguard(mode='freeze', extra_idxs=[39])
    before = snapshot(m)
    train(learn, 2)
    names = learn.pad_guard.guarded
    test_eq(list(names.values()), [(0, 39)])
    assert 'm.shared.weight' in list(names)[0] and 'm.lm_head.weight' in list(names)[0]
    check(learn, before, names, mode='freeze')

def test_nanogpt_position_table_never_guarded():
    dls = protein_lm_dls(n=200, bs=16, seq_len=16, device=DEV)
    n = len(dls.vocab)
    torch.manual_seed(0)
    m = NanoGPT(n, n)
    learn = Learner(dls, m, loss_func=CrossEntropyLossFlat(), wd=0.1).padguard()
    before = snapshot(m)
    train(learn)
    rows = tuple(i for i,t in enumerate(dls.vocab) if t in ('xxpad', 'xxfake'))
    check(learn, before, {'transformer.wte.weight = lm_head.weight': rows}, untouched={'transformer.wpe.weight': list(rows[:2]) + [0, 2]})

def text_seq2seq_dls(swap=False):
    "A fastai seq2seq DataBlock with two TextBlocks: source vocab 32 (3 xxfake), target vocab 40 (4 xxfake)"
    AA, TG = 'ACDEFGHIKLMNPQRSTVWY', 'abcdefghijklmnopqrstuvwxyz0'
    src = protein_seqs(200, min_len=5, max_len=30, seed=1)
    tgt = [''.join(TG[(AA.index(c)*3+i) % 27] for i,c in enumerate(s)) for s in src]
    df = pd.DataFrame({'src': tgt if swap else src, 'tgt': src if swap else tgt})
    tb = lambda col: TextBlock.from_df(col, tok=CharTokenizer(), rules=[], n_workers=0, min_freq=1, tok_text_col=col+'_tok')
    dblock = DataBlock(blocks=(tb('src'), tb('tgt')), get_x=ColReader('src_tok'), get_y=ColReader('tgt_tok'),
                       splitter=RandomSplitter(seed=0), n_inp=1)
    return dblock.dataloaders(df, bs=16, num_workers=0, device=DEV)

class Seq2Seq(nn.Module):
    "Source embedding, GRU, output tied to the target embedding"
    def __init__(self, ns, nt, d=16):
        super().__init__()
        self.enc, self.dec = nn.Embedding(ns, d, padding_idx=1), nn.Embedding(nt, d, padding_idx=1)
        self.rnn = nn.GRU(d, d, batch_first=True)
        self.out = nn.Linear(d, nt); self.out.weight = self.dec.weight
    def forward(self, x): return self.out(self.rnn(self.enc(x))[0])

@pytest.mark.parametrize('swap', [False, True])
def test_fastai_seq2seq_two_vocabs(swap):
    dls = text_seq2seq_dls(swap)
    sv, tv = dls.vocab
    assert (len(sv), len(tv)) == ((40, 32) if swap else (32, 40))
    rows = lambda v: tuple(i for i,t in enumerate(v) if t in ('xxpad', 'xxfake'))
    torch.manual_seed(0)
    m = Seq2Seq(len(sv), len(tv))
    learn = Learner(dls, m, loss_func=CrossEntropyLossFlat(), wd=0.1).padguard()
    assert learn.loss_func.rows == rows(tv), "the loss leaves out the target vocab's rows, not the source's"
    before = snapshot(m)
    train(learn, 2)
    check(learn, before, {'enc.weight': rows(sv), 'dec.weight = out.weight': rows(tv), 'out.bias': rows(tv)})
    # no real target token is dropped from the loss: only pad positions are ignored
    _, y = dls.one_batch()
    kept = ~torch.isin(y, torch.tensor(learn.loss_func.rows, device=y.device))
    assert torch.equal(kept, y != 1)

def test_seq2seq_same_size_vocabs_with_different_fakes_says_how():
    "Two vocabs of one size whose xxfake rows differ: it can't tell which one an embedding reads"
    src, tgt = ['xxunk','xxpad'] + list('abcdef') + ['xxfake']*2, ['xxunk','xxpad'] + list('ABCDEFG') + ['xxfake']
    m = Seq2Seq(10, 10)
    with pytest.raises(ValueError, match='extra_idxs='): find_guarded(m, [src, tgt], extra_idxs='fake')
    test_eq(find_guarded(m, [src, tgt], extra_idxs=[9]).rows, {'enc.weight': (1, 9), 'dec.weight = out.weight': (1, 9), 'out.bias': (1, 9)})

def test_unknown_embedding_names_emb():
    class Odd(nn.Module):
        def __init__(self): super().__init__(); self.a, self.b = nn.Embedding(20, 4), nn.Embedding(30, 4)
    x = torch.randint(0, 20, (32, 5))
    learn = Learner(DataLoaders.from_dsets(list(zip(x, x)), list(zip(x, x)), bs=8), Odd(), loss_func=CrossEntropyLossFlat())
    with pytest.raises(ValueError, match="emb="): learn.padguard(pad_idx=0)
    learn.padguard(pad_idx=0, emb='a')
    test_eq(learn.pad_guard.guarded, {'a.weight': (0,)})
    with pytest.raises(ValueError, match="not a module of the learner's model"): learn.padguard(pad_idx=0, emb=nn.Embedding(3, 3))

def test_pad_idx_against_hf_config():
    m = gpt2(True)
    learn = Learner(token_dls(50, 50), m, loss_func=CrossEntropyLossFlat(), cbs=Logits())
    with pytest.raises(ValueError, match="pad_idx=3 but the model's config.pad_token_id is 50"): learn.padguard(pad_idx=3)

def test_embedding_matching_no_vocab_of_several():
    src, tgt = ['xxunk','xxpad'] + list('abcdef'), ['xxunk','xxpad'] + list('ABCDEFGHIJ')
    class M(nn.Module):
        def __init__(self): super().__init__(); self.x = nn.Embedding(11, 4, padding_idx=1)
    with pytest.raises(ValueError, match="can't be told which vocab it reads"): find_guarded(M(), [src, tgt], emb='x')
    with pytest.raises(ValueError, match="emb="): find_guarded(M(), [src, tgt])
