"README's demo command prints the table: plain fastai drifts, padguard() holds exactly (issue: core)"
import re, subprocess, sys

def test_demo_command_prints_table():
    out = subprocess.run([sys.executable, '-m', 'fastai_padguard.demo', '--n', '400'], check=True, capture_output=True, text=True, timeout=300).stdout
    rows = {l.split('  ')[0].strip(): l for l in out.splitlines() if l.startswith(('plain fastai', 'learn.padguard()'))}
    assert set(rows) == {'plain fastai', 'learn.padguard()'}, out
    plain = [float(v) for v in rows['plain fastai'].split()[2:]]
    guarded = [float(v) for v in rows['learn.padguard()'].split()[1:]]
    assert plain[0] > 0 and plain[1] > 0, out          # pad row and xxfake rows moved
    assert guarded[0] == 0 and guarded[1] == 0, out    # exactly 0 with the guard
