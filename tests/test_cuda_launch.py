"""The fast kernel launch of ``fanin.kernels.cuda_kernels`` (no GPU needed): its parameter list must be exactly the
one Numba's launcher builds (``_Kernel._prepare_args``), and its signature key must never let one key stand for two
of Numba's argument types. Device arrays here are Numba ``DeviceNDArray`` objects over fake device memory (only the
pointer is read; nothing is launched). On a GPU, ``tests/test_cuda_device.py`` checks that launches take the path.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os

import numpy as np
import pytest

HAVE_NUMBA_CUDA = importlib.util.find_spec("numba_cuda") is not None
pytestmark = [
    pytest.mark.skipif(not HAVE_NUMBA_CUDA, reason="numba-cuda is not installed (the `cuda` extra)"),
    pytest.mark.skipif(os.environ.get("NUMBA_ENABLE_CUDASIM", "0") == "1", reason="real Numba device arrays only"),
]


class _FakeMemory:
    """Stands in for Numba's device memory: a pointer and a size."""

    def __init__(self, ptr, size):
        self.device_ctypes_pointer = ctypes.c_size_t(ptr)
        self.size = size


def _array(shape, strides, dtype, ptr=1 << 20):
    from numba.cuda.cudadrv.devicearray import DeviceNDArray

    return DeviceNDArray(shape, strides, np.dtype(dtype), gpu_data=_FakeMemory(ptr, 1 << 30))


class _Stub:
    extensions: list = []


def _numba_params(args):
    """What Numba's launcher passes for args (its typing and ``_Kernel._prepare_args``)."""
    from numba.cuda.dispatcher import _Kernel
    from numba.cuda.typing.typeof import Purpose, typeof

    tys = tuple(typeof(a, Purpose.argument) for a in args)
    out, retr = [], []
    for ty, a in zip(tys, args):
        _Kernel._prepare_args(_Stub(), ty, a, 0, retr, out)
    assert not retr
    return tys, out


def _args():
    f4 = np.float32
    return [
        _array((4096,), (4,), f4),                       # contiguous 1-D
        _array((100,), (8,), f4, ptr=(1 << 20) + 64),    # strided 1-D: layout A
        _array((1,), (12,), f4),                         # one element, odd stride: C
        _array((300,), (2,), np.int16),
        _array((7,), (8,), np.int64),
        _array((256, 4096), (16384, 4), f4),             # 2-D C
        _array((64, 32), (4, 256), np.float64),          # 2-D F
        5, -3, 2 ** 40, 1.5, f4(0.25), np.float64(2.0), True, False, np.bool_(True), np.int32(-7), np.int64(9),
        np.uint32(3),
    ]


@pytest.fixture
def fast():
    from fanin.kernels import cuda_kernels as CK

    was = CK.FAST_LAUNCH
    CK.enable_fast_launch(True)
    yield CK
    CK.FAST_LAUNCH = was


def test_parameters_are_numbas(fast):
    args = _args()
    sig, params = fast._marshal(args)
    assert sig is not None
    tys, ref = _numba_params(args)
    assert len(params) == len(ref)
    for i, (a, b) in enumerate(zip(params, ref)):
        assert fast._same_param(a, b), (i, a, b)
    assert fast._sig_mismatch(args, tys) == ""


def test_each_argument_alone(fast):
    for a in _args():
        sig, params = fast._marshal([a])
        tys, ref = _numba_params([a])
        assert len(params) == len(ref) and all(fast._same_param(x, y) for x, y in zip(params, ref)), (a, params, ref)
        assert fast._sig_mismatch([a], tys) == "", a


def test_keys_separate_layouts_and_types(fast):
    c = _array((100,), (4,), np.float32)
    s = _array((100,), (8,), np.float32)
    d = _array((100,), (8,), np.float64)
    keys = {fast._marshal([a])[0] for a in (c, s, d)} | {fast._marshal([x])[0] for x in (1, 1.0, True, np.float32(1))}
    assert len(keys) == 7


def test_unknown_arguments_take_numbas_path(fast):
    assert fast._marshal([np.zeros(3, np.float32)]) == (None, None)  # a host array: Numba copies it
    assert fast._marshal([(1, 2)]) == (None, None)
    assert fast._marshal([_array((), (), np.float32)]) == (None, None)


def test_a_wrong_key_is_refused(fast):
    """A signature whose key would not name Numba's argument types exactly is refused (kept on Numba's path)."""
    from numba import types

    a = _array((100,), (4,), np.float32)
    assert "layout" in fast._sig_mismatch([a], (types.Array(types.float32, 1, "A"),))
    assert fast._sig_mismatch([5], (types.int32,)) != ""


_POOL_SCRIPT = r'''
import ctypes, gc, threading
import numpy as np
from numba import cuda
cuda.is_available = lambda: True  # no GPU here: fanin.kernels.cuda imports, allocations go to a fake context


class Owned:  # what Numba's memalloc returns: an owner with a pointer, a context and a ctypes pointer
    count = 0
    def __init__(self, n):
        Owned.count += 1
        self.device_pointer = (1 << 24) * Owned.count
        self.device_ctypes_pointer = ctypes.c_size_t(self.device_pointer)
        self.context = None
        self.size = n


class Ctx:
    def memalloc(self, n):
        return Owned(n)


from fanin.kernels import cuda as KC

KC._CTX[:] = [(threading.get_ident(), Ctx())]
ptr = lambda a: a.device_ctypes_pointer.value

a = KC.empty((4, 8), np.float32)
p = ptr(a)
assert KC.POOL_STATS == {"hits": 0, "misses": 1}
del a
gc.collect()
b = KC.empty((32,), np.float32)  # same byte size: the same buffer
assert ptr(b) == p and KC.POOL_STATS["hits"] == 1
v = KC._view1(b.reshape(4, 8))  # views keep the buffer
w = KC._DNA((29,), (4,), np.float32, gpu_data=b.gpu_data.view(12))  # what b[3:] makes (needs a driver)
del b
gc.collect()
c = KC.empty((32,), np.float32)
assert ptr(c) != p and ptr(v) == p and ptr(w) == p + 12
del v
gc.collect()
assert not KC._pool.get(128)  # the slice still holds it
del w
gc.collect()
assert len(KC._pool[128]) == 1
d = KC.empty((16,), np.float64)
assert ptr(d) == p
e = KC.empty((3,), np.float32)  # another size: a new buffer
assert ptr(e) not in (p, ptr(c))
KC.POOL_LIMIT = 100
del c, d
gc.collect()
assert KC._pool_bytes[0] == 0  # over the limit: given back to Numba
KC.POOL_LIMIT = 0
f = KC.empty((5,), np.float32)
assert type(f.gpu_data) is Owned  # the pool off: Numba's own allocation
print("ok")
'''


def test_pool_reuses_a_buffer_only_after_its_last_view_is_gone(tmp_path):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    r = subprocess.run([sys.executable, "-c", _POOL_SCRIPT], capture_output=True, text=True, env=env, cwd=root,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout[-3000:] + r.stderr[-3000:]
