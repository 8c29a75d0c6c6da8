"""The CUDA kernels compile to PTX for Ampere (sm_80) and Hopper (sm_90) with the signatures the dispatcher uses,
and the `cuda` extra's numba-cuda imports with the installed NumPy. No GPU needed (NVVM ships with the extra).

The signatures are recorded by running every dispatcher path under the simulator with launches switched off
(``fanin.kernels.cuda_ptx.record``, in a subprocess since the simulator is chosen at import); each is then compiled
here, outside the simulator, the tile kernels also in the 8-warp configuration and the panel kernel in the one
large layers get on a GPU.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAVE_NUMBA_CUDA = importlib.util.find_spec("numba_cuda") is not None
needs_cuda_extra = pytest.mark.skipif(not HAVE_NUMBA_CUDA,
                                      reason="numba-cuda is not installed (the `cuda` extra: pip install -e '.[cuda]')")
SIM = os.environ.get("NUMBA_ENABLE_CUDASIM", "0") == "1"
pytestmark = pytest.mark.skipif(SIM, reason="compiles outside the simulator")


def _cuda_extra():
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]["optional-dependencies"]["cuda"]


def test_cuda_extra_pins_a_numpy_that_numba_cuda_imports_with():
    """numba-cuda 0.30.x calls np.row_stack, which NumPy 2.5 removed (docs/GPU.md): the extra must keep NumPy < 2.5."""
    extra = _cuda_extra()
    assert any(re.match(r"numba-cuda\[cu13\]\s*==\s*0\.30\.\d+", r) for r in extra), extra
    assert any(r.replace(" ", "").startswith("numpy") and "<2.5" in r.replace(" ", "") for r in extra), extra


@needs_cuda_extra
def test_numba_cuda_imports_with_the_installed_numpy():
    r = subprocess.run([sys.executable, "-c", "import numpy, numba.cuda; from numba.cuda import compile_ptx; "
                        "print(numpy.__version__)"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    version = importlib.metadata.version("numba-cuda")
    if version.startswith("0.30."):
        major, minor = (int(v) for v in np.__version__.split(".")[:2])
        assert (major, minor) < (2, 5), f"numba-cuda {version} needs NumPy < 2.5, found {np.__version__}"


def _record():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "fanin.kernels.cuda_ptx"], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout)


def _compile(args):
    records, cc = args
    from fanin.kernels import cuda_ptx

    t = time.perf_counter()
    res = cuda_ptx.compile_ptx(records, cc)
    took = time.perf_counter() - t
    return cc, took, [(list(k), str(sig), len(re.findall(r"\b(?:ld|st)\.local", ptx)),
                       f".target sm_{cc[0]}{cc[1]}" in ptx) for k, sig, ptx in res]


@pytest.fixture(scope="module")
def compiled():
    records = _record()
    with ProcessPoolExecutor(2) as pool:  # one process per architecture
        results = list(pool.map(_compile, [(records, (8, 0)), (records, (9, 0))]))
    return records, {cc: (took, rows) for cc, took, rows in results}


@needs_cuda_extra
@pytest.mark.parametrize("cc", [(8, 0), (9, 0)])
def test_every_kernel_compiles_to_ptx(compiled, cc):
    records, by_cc = compiled
    took, rows = by_cc[cc]
    kinds = {tuple(r[0])[0] for r in records}
    # every family of kernel the backend has was exercised by the recording
    from fanin.kernels import cuda_kernels as K

    families = {"rows", "tile", "dvals", "dvals_rows", "transpose", "gemm", "topc", *K.MODULE_KERNELS}
    assert families <= kinds, f"not exercised: {sorted(families - kinds)}"
    assert all(ok for *_, ok in rows), [r for r in rows if not r[3]]
    print(f"sm_{cc[0]}{cc[1]}: {len(rows)} kernel signatures compiled in {took:.1f} s")


@needs_cuda_extra
def test_sparse_kernels_keep_their_accumulators_in_registers(compiled):
    """The per-lane sample accumulators and the GEMM tile are compile-time-sized local arrays: NVVM must promote them
    to registers (no local-memory traffic in the hot loops)."""
    _, by_cc = compiled
    _, rows = by_cc[(9, 0)]
    spills = [(k, sig) for k, sig, n_local, _ in rows if n_local and k[0] in ("rows", "tile", "dvals", "gemm")]
    assert not spills, spills


def test_import_fanin_and_a_cpu_step_never_load_numba_cuda():
    code = ("import sys, numpy as np, fanin\n"
            "m = fanin.models.mlp([8, 6, 3], sparsity=0.5)\n"
            "opt = fanin.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)\n"
            "loss = fanin.ops.cross_entropy(m(fanin.Tensor(np.ones((9, 8), np.float32))), np.zeros(9, int))\n"
            "loss.backward(); opt.step()\n"
            "bad = [k for k in ('numba.cuda', 'numba_cuda.numba.cuda', 'fanin.kernels.cuda', 'fanin.device') "
            "if k in sys.modules]\n"
            "assert not bad, bad\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
