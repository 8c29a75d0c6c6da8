"""The huge-page buffer pool behind the packed kernel operands (fanin.kernels.memory)."""
import os
import subprocess
import sys

import numpy as np
import pytest

from fanin.kernels import cpu, memory

needs_pool = pytest.mark.skipif(not memory.enabled(), reason="no MADV_HUGEPAGE on this system")


def span(a):
    return a.ctypes.data, a.ctypes.data + a.nbytes


def overlaps(a, b):
    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


@needs_pool
def test_empty_is_a_plain_writable_c_array_on_the_pool():
    a = memory.empty((300, 128), np.float32)
    assert a.shape == (300, 128) and a.dtype == np.float32
    assert a.flags.c_contiguous and a.flags.writeable and a.ctypes.data % memory.ALIGN == 0
    assert isinstance(a.base, memory._Piece)
    a[...] = np.arange(a.size, dtype=np.float32).reshape(a.shape)
    assert a[299, 127] == a.size - 1


@needs_pool
def test_a_piece_is_reused_only_after_every_view_is_gone():
    before = memory.stats()["in_use"]
    a = memory.empty((512, 128), np.float32)
    addr = a.ctypes.data
    assert memory.stats()["in_use"] == before + a.nbytes
    view = a[10:20]
    del a
    b = memory.empty((512, 128), np.float32)  # same size: must not land on the memory the view still reads
    assert not overlaps(view, b)
    view[...] = 1.0
    b[...] = 2.0
    assert np.all(view == 1.0)
    del view
    c = memory.empty((512, 128), np.float32)  # now the freed piece comes back
    assert c.ctypes.data == addr
    del b, c
    assert memory.stats()["in_use"] == before


def test_small_arrays_and_a_full_pool_fall_back_to_numpy(monkeypatch):
    small = memory.empty((4, 4), np.float32)
    assert not isinstance(small.base, memory._Piece)
    monkeypatch.setattr(memory._POOL, "limit", memory._POOL.mapped)  # no room for another chunk
    big = memory.empty((memory.CHUNK // 4 + 1,), np.float32)
    assert not isinstance(big.base, memory._Piece) and big.shape == (memory.CHUNK // 4 + 1,)


def test_pool_can_be_switched_off():
    code = "import fanin, numpy as np; from fanin.kernels import memory as m; " \
           "a = m.empty((1024, 128), np.float32); print(m.enabled(), type(a.base).__name__)"
    env = {**os.environ, "FANIN_HUGEPAGES": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "NoneType"]


def test_packed_operands_are_the_same_on_and_off_the_pool(monkeypatch):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((100, 700)).astype(np.float32)
    on = cpu.pack_panels(x)
    monkeypatch.setattr(memory, "_ENABLED", False)
    off = cpu.pack_panels(x)
    np.testing.assert_array_equal(on, off)
    np.testing.assert_array_equal(on[:, :100], x.T)
    assert np.all(on[:, 100:] == 0)
