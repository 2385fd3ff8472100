#!/usr/bin/env bash
# The GPU checks behind README's CUDA figures: the CUDA tests, the model families on CUDA, the benchmarks at ULMFiT size and
# at a 250k vocab, and the sync-debug run (inside bench/step.py). Usage: OUT=some/dir bash bench/cuda_checks.sh
set -u
OUT=${OUT:-bench/_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
py=${PYTHON:-python3}
{ nvidia-smi -L; $py -c "import sys, torch, fastai, transformers; print(sys.version.split()[0], 'torch', torch.__version__, 'fastai', fastai.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"; } 2>&1 | tee "$OUT/gpu.txt"
timeout 240 $py -m pytest -q -p no:cacheprovider -rs tests/test_robust.py tests/test_fused.py -k cuda > "$OUT/cuda_tests.txt" 2>&1; tail -40 "$OUT/cuda_tests.txt"
PADGUARD_DEVICE=cuda timeout 150 $py -m pytest -q -p no:cacheprovider tests/test_models.py 2>&1 | tail -15 | tee "$OUT/cuda_models.txt"
timeout 200 $py bench/step.py --device cuda --reps 10 --steps 5 --json "$OUT/results-cuda.json" 2>&1 | tee "$OUT/step-cuda.txt"
timeout 90 $py bench/loss.py --device cuda --reps 20 2>&1 | tee "$OUT/loss-cuda.txt"
timeout 90 $py bench/loss.py --device cuda --reps 20 --vocab 250000 2>&1 | tee -a "$OUT/loss-cuda.txt"
timeout 200 $py bench/step.py --device cuda --reps 10 --steps 5 --vocab 250000 --json "$OUT/results-cuda-250k.json" 2>&1 | tee -a "$OUT/step-cuda.txt"
# issue 16: the fused path beside padguard(fused=False), plain fastai and torch's F.linear_cross_entropy (Liger and CCE in bench/loss.py)
timeout 200 $py bench/step.py --fused --bs 16 --device cuda --reps 10 --steps 5 --json "$OUT/results-fused-cuda.json" 2>&1 | tee -a "$OUT/step-cuda.txt"
timeout 200 $py bench/step.py --fused --bs 16 --device cuda --reps 10 --steps 5 --vocab 250000 --json "$OUT/results-fused-cuda-250k.json" 2>&1 | tee -a "$OUT/step-cuda.txt"
# the same with the small tied AWD-LSTM of issue 16's targets (README's quick-start sizes: the output layer and loss dominate the step)
timeout 200 $py bench/step.py --fused --emb 32 --hid 64 --layers 2 --bs 16 --device cuda --reps 10 --steps 5 --json "$OUT/results-fused-small-cuda.json" 2>&1 | tee -a "$OUT/step-cuda.txt"
timeout 200 $py bench/step.py --fused --emb 32 --hid 64 --layers 2 --bs 16 --device cuda --reps 10 --steps 5 --vocab 250000 --json "$OUT/results-fused-small-cuda-250k.json" 2>&1 | tee -a "$OUT/step-cuda.txt"
# issue 26: a whole fit_one_cycle(1) with validation and metrics (the rows found, training, validation), at 60k and 250k
timeout 200 $py bench/fit.py --device cuda --reps 5 --json "$OUT/results-fit-cuda.json" 2>&1 | tee -a "$OUT/fit-cuda.txt"
timeout 200 $py bench/fit.py --device cuda --reps 5 --vocab 250000 --json "$OUT/results-fit-cuda-250k.json" 2>&1 | tee -a "$OUT/fit-cuda.txt"
