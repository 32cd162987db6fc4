#!/usr/bin/env bash
# On a lent GPU machine, in one call: build the package (and the C++/CUDA
# extension when present) against the machine's torch, run the test suite on
# the GPU, run every benchmark, and render the report. Everything lands in
# bench/results/ (commit it).
set -euo pipefail
cd "$(dirname "$0")/.."
stamp=$(date +%Y%m%d-%H%M%S)
mkdir -p bench/results
python -m pip install -q --no-build-isolation ".[test,data]"
{ nvidia-smi || true; python -c "import torch, sys; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } \
    > "bench/results/gpu-env-$stamp.txt" 2>&1
python -m pytest tests -q -x -p no:cacheprovider 2>&1 | tee "bench/results/gpu-tests-$stamp.txt"
python -m pytest bench/ --benchmark -q -p no:cacheprovider 2>&1 | tee "bench/results/gpu-bench-$stamp.txt"
python -m iddpm_fast bench --report
