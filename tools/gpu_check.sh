#!/usr/bin/env bash
# The real-GPU checks of issue 14 in one command (`make test-gpu` runs it): the device tests, PTX compilation, and
# bench/bench_cuda.py. On a machine whose Python lacks a NumPy that numba-cuda 0.30.4 imports with (NumPy 2.5
# removed np.row_stack), put numpy==2.4.6 and numba-cuda==0.30.4 wheels in .whl/ first; they go into /tmp/site.
# Logs go to $OUT (default ./gpu-out).
set -o pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
PY=${PY:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv | tee "$OUT/device.txt"
$PY -c "import numpy, numba, numba_cuda; from numba import cuda; print('numpy', numpy.__version__, 'numba', numba.__version__, 'numba-cuda', numba_cuda.__version__, 'gpu', cuda.is_available())" | tee -a "$OUT/device.txt" || exit 1
timeout ${TEST_TIMEOUT:-210} $PY -m pytest -q -p no:cacheprovider -ra tests/test_cuda_device.py tests/test_cuda_ptx.py 2>&1 | tee "$OUT/tests.log"
rc=$?
timeout ${BENCH_TIMEOUT:-210} $PY bench/bench_cuda.py ${BENCH_ARGS:---quick --train-rounds 1} --out "$OUT/gpu_section.md" 2>&1 | tee "$OUT/bench.log"
exit $rc
