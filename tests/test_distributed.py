"Two processes on CPU (gloo, loopback) train a guarded tied LM with fastai's distrib_ctx (issue: robustness)"
import os, subprocess, sys, shutil
from pathlib import Path
import pytest, torch

HERE = Path(__file__).resolve().parent

def _free_port():
    "A free TCP port on the loopback interface"
    import socket
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); return s.getsockname()[1]

@pytest.mark.slow
@pytest.mark.parametrize('mode', ['zero', 'freeze', 'rows'])
def test_two_process_cpu_training_holds_rows_identically(tmp_path, mode):
    torchrun = Path(sys.executable).parent/'torchrun'
    env = {**os.environ, 'ACCELERATE_USE_CPU': '1', 'MASTER_ADDR': '127.0.0.1', 'OMP_NUM_THREADS': '1'}
    r = subprocess.run([str(torchrun), '--nproc_per_node', '2', '--master_addr', '127.0.0.1', '--master_port', str(_free_port()),
                        str(HERE/'dist_train.py'), str(tmp_path), mode], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path/f'rank{i}.pt') for i in (0, 1))
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
        assert not torch.equal(r0['rows']['0.encoder.weight_trained_rows'], r0['w'][[5, 6]]), "the chosen rows trained"

@pytest.mark.slow
@pytest.mark.parametrize('mode', ['zero', 'freeze'])
def test_rows_on_fsdp2_shards_equal_one_process(tmp_path, mode):
    "fully_shard per block (gloo, 2 processes), 5 AdamW steps with weight decay, float64: bitwise one process's; rows 0 or as they were"
    if not hasattr(__import__('torch.distributed.fsdp', fromlist=['x']), 'fully_shard'): pytest.skip('torch.distributed.fsdp.fully_shard: torch >= 2.6')
    torchrun = Path(sys.executable).parent/'torchrun'
    env = {**os.environ, 'MASTER_ADDR': '127.0.0.1', 'OMP_NUM_THREADS': '1'}
    r = subprocess.run([str(torchrun), '--nproc_per_node', '2', '--master_addr', '127.0.0.1', '--master_port', str(_free_port()),
                        str(HERE/'fsdp_rows.py'), str(tmp_path), mode], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path/f'rank{i}.pt') for i in (0, 1))
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
