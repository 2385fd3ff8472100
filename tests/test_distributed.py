"Two processes on CPU (gloo, loopback) train a guarded tied LM with fastai's distrib_ctx (issue: robustness)"
from pathlib import Path
import pytest, torch
from conftest import two_processes

@pytest.mark.slow
@pytest.mark.parametrize('mode', ['zero', 'freeze', 'rows'])
def test_two_process_cpu_training_holds_rows_identically(tmp_path, mode):
    r0, r1 = two_processes('dist_train.py', tmp_path, mode, env={'ACCELERATE_USE_CPU': '1'})
    rows = list(r0['guarded'])
    assert rows == [1, 29, 30, 31]
    for r in (r0, r1):
        assert r['steps'] and all(r['steps']), "pad row exactly 0 after every step on every rank"
        # the fused output layer and loss ran in every training batch under DDP (train_rows hooks the head: logits computed)
        assert set(r['preds']) == ({'Tensor'} if mode == 'rows' else {'FusedLogits'})
        if mode == 'zero':
            assert torch.equal(r['w'][rows], torch.zeros(len(rows), r['w'].shape[1]))
            assert torch.equal(r['b'][rows], torch.zeros(len(rows)))
    assert len(r0['steps']) == len(r1['steps'])
    assert torch.equal(r0['w'], r1['w']) and torch.equal(r0['b'], r1['b']), "ranks hold identical weights"
    if mode == 'rows':  # train_rows: the table and bias never changed (checked after every step); the chosen rows trained alike
        assert r0['rows'].keys() == {'0.encoder.weight_trained_rows', '1.decoder.bias_trained_rows'}
        for k in r0['rows']: assert torch.equal(r0['rows'][k], r1['rows'][k])
        assert not torch.equal(r0['rows']['0.encoder.weight_trained_rows'], r0['w'][[10, 11]]), "the chosen rows trained"

@pytest.mark.slow
@pytest.mark.parametrize('mode', ['zero', 'freeze'])
def test_rows_on_fsdp2_shards_equal_one_process(tmp_path, mode):
    "fully_shard per block (gloo, 2 processes), 5 AdamW steps with weight decay, float64: bitwise one process's; rows 0 or as they were"
    if not hasattr(__import__('torch.distributed.fsdp', fromlist=['x']), 'fully_shard'): pytest.skip('torch.distributed.fsdp.fully_shard: torch >= 2.6')
    r0, r1 = two_processes('fsdp_rows.py', tmp_path, mode)
    assert (r0['local_shape'], r1['local_shape']) == ((7, 6), (6, 6)), "13 rows: 7 on rank 0, 6 on rank 1"
    assert (r0['local_rows'], r1['local_rows']) == ((1,), (5,)), "the pad on rank 0's shard, row 12 on rank 1's (its 6th)"
    assert 'sharded' in (r0['fused_why'] or '') and 'FSDP2' in r0['fused_why'], "the fused pass is off for a sharded output layer, saying why"
    for r in (r0, r1):
        assert r['rows'] == {'emb.weight = head.weight': (1, 12), 'head.bias': (1, 12)}
        assert torch.equal(r['losses'], r['ref_losses'])
        for n, p in r['ref'].items():
            assert torch.equal(r['full'][n], p), n
            assert not torch.equal(r['full'][n], r['before'][n]), f"{n} trained"
        rows = [1, 12]
        for n in ('emb.weight', 'head.bias'):
            want = torch.zeros_like(r['before'][n][rows]) if mode == 'zero' else r['before'][n][rows]
            assert torch.equal(r['full'][n][rows], want), n

def _fsdp_run(tmp_path, *args):
    "tests/fsdp_train.py on 2 processes (torchrun, gloo): each rank's results"
    if not hasattr(__import__('torch.distributed.fsdp', fromlist=['x']), 'fully_shard'): pytest.skip('torch.distributed.fsdp.fully_shard: torch >= 2.6')
    return two_processes('fsdp_train.py', tmp_path, *args, cwd=tmp_path)

@pytest.fixture(scope='module', params=['awd', 'gpt2'])
def fsdp_family(request, tmp_path_factory):
    "One 2-process run of tests/fsdp_train.py per family, read by the tests below"
    return request.param, _fsdp_run(tmp_path_factory.mktemp(f'fsdp-{request.param}'), request.param)

def _rel(a, b): return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()  # 0 for two zero tensors

# the guarded rows each rank's shard holds: 'awd' rows [1, 29, 30, 31] of a 32-row table (16 a rank), 'gpt2' rows [0, 39] of 40
SHARD_ROWS = {'awd': ({'0.encoder.weight = 0.encoder_dp.emb.weight = 1.decoder.weight': 1, '1.decoder.bias': 1},
                      {'0.encoder.weight = 0.encoder_dp.emb.weight = 1.decoder.weight': 3, '1.decoder.bias': 3}),
              'gpt2': ({'transformer.wte.weight = lm_head.weight': 1}, {'transformer.wte.weight = lm_head.weight': 1})}

@pytest.mark.slow
def test_fsdp_ctx_trains_like_one_process(fsdp_family):
    "learn.fsdp_ctx(), 2 processes, per block, float64, 5 AdamW steps with wd: one process's losses and weights; rows 0 on every shard"
    family, (r0, r1) = fsdp_family
    for r in (r0, r1):
        assert _rel(r['losses'], r['ref_losses']) < 1e-12, "each step's loss (the mean of the ranks' halves) is one process's"
        for n, p in r['ref'].items(): assert _rel(r['fsdp'][n], p) < 1e-12, n  # fused (one process) equals unfused (FSDP2)
        assert 'sharded' in r['guard'] and 'fused: off' in r['guard'], "the fused pass is off under FSDP2, with the reason"
    for r, want in zip((r0, r1), SHARD_ROWS[family]):
        assert len(r['checks']) == 5 * len(want), "checked after each of 5 steps"
        assert {(n, k) for n, k, _ in r['checks']} == set(want.items()), "each rank holds its share of the guarded rows"
        assert all(ok for *_, ok in r['checks']), "the guarded rows of every shard exactly 0 after every step"
    rows = [1, 29, 30, 31] if family == 'awd' else [0, 39]
    emb = '0.encoder.weight' if family == 'awd' else 'transformer.wte.weight'
    assert torch.equal(r0['fsdp'][emb][rows], torch.zeros(len(rows), r0['fsdp'][emb].shape[1]))
    # validation gathered across the ranks; an AWD-LSTM's hidden state starts anew at each rank's half of the validation stream
    assert r0['valid'] == r1['valid'] and abs(r0['valid'] - r0['ref_valid']) / r0['ref_valid'] < (1e-12 if family == 'gpt2' else 1e-3)
    if family == 'gpt2':  # get_preds: each batch's parts gathered, in fastai's DistributedDL order (as distrib_ctx's)
        (p, t), (rp, rt) = r0['preds'], r0['ref_preds']
        order = [i for k in range(0, 16, 8) for r in (0, 16) for i in range(r + k, r + k + 8)]  # 32 items: 16 a rank, 8 a batch
        assert p.shape == rp.shape and torch.equal(t, rt[order]) and _rel(p, rp[order]) < 1e-12

@pytest.mark.slow
def test_fsdp_ctx_checkpoint_export_and_inplace_hazard(fsdp_family):
    "Sharded learn.save/load restore bitwise; export loads with load_learner in one process; an in-place edit of the output is refused"
    from fastai.learner import load_learner
    family, (r0, r1) = fsdp_family
    for r in (r0, r1):
        assert r['moved'] and r['restored'], "trained past the checkpoint, then load put every weight back bitwise"
        assert r['opt_restored'] and r['opt_tensors'] > 0, "and the optimizer's state"
        assert isinstance(r['inplace'], str), f"the in-place edit trained: weights {r['inplace']:.3g} (max rel.) from the run editing a copy"
        assert 'edited in place' in r['inplace'] and r['inplace_unchanged'], "refused before the backward: the weights as they were"
        assert r['after_type'] in ('SequentialRNN', 'GPT2LMHeadModel'), "on leaving, a plain whole model"
        o_in, o_out = r['opt_in'], r['opt_out']
        assert len(o_in) == len(o_out) and all(a.keys() == b.keys() for a, b in zip(o_in, o_out)), "the optimizer's state carried over"
        assert all(type(b[k]) is torch.Tensor and torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k]
                   for a, b in zip(o_in, o_out) for k in a), "gathered whole, bitwise, plain tensors"
    for n in r0['after']: assert torch.equal(r0['after'][n], r1['after'][n]), n
    learn = load_learner(Path(r0['export']), cpu=True)
    got = dict(learn.model.named_parameters())
    assert got.keys() == r0['after'].keys()
    for n, p in r0['after'].items(): assert torch.equal(got[n].detach(), p), n
    assert type(learn.model).__name__ == r0['after_type']

@pytest.mark.slow
def test_fsdp_ctx_mixed_precision_keeps_rows(tmp_path):
    "mp='bf16' (FSDP2's MixedPrecisionPolicy): the losses near one float64 process's, the guarded rows of every shard exactly 0"
    r0, r1 = _fsdp_run(tmp_path, 'gpt2', 'bf16')
    for r in (r0, r1):
        assert _rel(r['losses'], r['ref_losses']) < 1e-2
        assert all(ok for *_, ok in r['checks']) and len(r['checks']) == 5

@pytest.mark.slow
@pytest.mark.parametrize('family', ['awd', 'gpt2'])
def test_fsdp_ctx_train_rows_moves_only_the_chosen_rows(tmp_path, family):
    "learn.train_rows(rows) then fsdp_ctx: one process's losses and weights, only the chosen rows of the tables moved, state for them alone"
    from fastai.learner import load_learner
    r0, r1 = _fsdp_run(tmp_path, family, 'rows')
    frozen = {'awd': ['0.encoder.weight', '1.decoder.bias'], 'gpt2': ['transformer.wte.weight']}[family]
    dim, chosen = r0['before'][frozen[0]].shape[1], r0['chosen']
    guarded = [1, 29, 30, 31] if family == 'awd' else [0, 39]
    kept = [i for i in range(len(r0['before'][frozen[0]])) if i not in guarded]  # the guard zeroed the others at the first step
    kept_ = [i for i in kept if i not in chosen]
    for r in (r0, r1):
        assert _rel(r['losses'], r['ref_losses']) < 1e-12
        for n, p in r['ref'].items(): assert _rel(r['fsdp'][n], p) < 1e-12, n
        for n in frozen:
            assert torch.equal(r['fsdp'][n][kept], r['before'][n][kept]), f"{n}: frozen while its rows train"
            assert not torch.equal(r['fsdp'][f'{n}_trained_rows'], r['before'][n][chosen]), f"{n}: the chosen rows trained"
        assert r['opt_shapes'] and (len(r['before'][frozen[0]]), dim) not in r['opt_shapes'], "no optimizer state the size of the table"
        assert (2, dim) in r['opt_shapes'], "state for the 2 chosen rows"
        assert not any(k.endswith('_trained_rows') for k in r['sd']), "state_dict() on the shards: the plain model's keys"
        for n in frozen:
            assert torch.equal(r['sd'][n][chosen], r['fsdp'][f'{n}_trained_rows']) and torch.equal(r['sd'][n][kept_], r['fsdp'][n][kept_]), n
        assert 'after leaving fsdp_ctx' in r['lift_inside'], "lifting on the shards is refused, saying when it can be done"
        assert all(ok for *_, ok in r['checks']) and r['moved'] and r['restored'] and r['opt_restored']
        assert isinstance(r['inplace'], str) and 'edited in place' in r['inplace']
    for n in r0['after']: assert torch.equal(r0['after'][n], r1['after'][n]), n
    lifted, before = r0['lifted'], r0['before']
    assert not any(n.endswith('_trained_rows') for n in lifted), "lifted on the whole model after the context"
    for n in frozen:
        assert torch.equal(lifted[n][chosen], r0['after'][f'{n}_trained_rows']), f"{n}: the trained rows written in"
        assert torch.equal(lifted[n][kept_], before[n][kept_]), f"{n}: every other row bitwise as it was"
        assert lifted[n][guarded].eq(0).all(), f"{n}: the guarded rows 0"
    learn = load_learner(Path(r0['export']), cpu=True)
    got = dict(learn.model.named_parameters())
    assert got.keys() == r0['after'].keys() and all(torch.equal(got[n].detach(), p) for n, p in r0['after'].items())
