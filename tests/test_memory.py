"""The huge-page buffer pool behind the packed kernel operands (fanin.kernels.memory)."""
import os
import queue
import subprocess
import sys
import threading

import numpy as np
import pytest

from fanin.kernels import cpu, memory

needs_pool = pytest.mark.skipif(not memory.enabled(), reason="no MADV_HUGEPAGE on this system")
MiB = 1 << 20


def span(a):
    return a.ctypes.data, a.ctypes.data + a.nbytes


def overlaps(a, b):
    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


def on_pool(a):
    while a.base is not None and not isinstance(a.base, memory._Piece):
        a = a.base
    return isinstance(a.base, memory._Piece)


@pytest.fixture
def pool(monkeypatch):
    """A private pool in place of the process's (so the numbers below are exact); ``pool(limit)`` for another cap."""
    made = []

    def make(limit=256 * MiB):
        p = memory._Pool(limit)
        monkeypatch.setattr(memory, "_POOL", p)
        made.append(p)
        return p

    make.default = make()
    yield make
    for p in made:  # every test frees its arrays: hand the mappings back
        if hasattr(p, "trim") and p._lock.acquire(timeout=5):  # (not after a deadlock)
            p._lock.release()
            p.trim()


@needs_pool
def test_empty_is_a_plain_writable_c_array_on_the_pool():
    a = memory.empty((300, 128), np.float32)
    assert a.shape == (300, 128) and a.dtype == np.float32
    assert a.flags.c_contiguous and a.flags.writeable and a.ctypes.data % memory.ALIGN == 0
    assert isinstance(a.base, memory._Piece)
    a[...] = np.arange(a.size, dtype=np.float32).reshape(a.shape)
    assert a[299, 127] == a.size - 1


@needs_pool
def test_shapes_may_be_ints_tuples_or_lists():
    for shape, dtype, want in [(70000, np.uint8, (70000,)), (np.int64(70000), "u1", (70000,)),
                               ([300, 64], "f8", (300, 64)), ((2, 3, 40000), np.float32, (2, 3, 40000))]:
        a = memory.empty(shape, dtype)
        assert a.shape == want and a.dtype == np.dtype(dtype) and on_pool(a)
    for dtype in [object, [("a", "f4"), ("b", "i8")], "(2,)f4"]:  # np.empty initialises or reshapes these
        a, b = memory.empty(40000, dtype), np.empty(40000, dtype)
        assert a.shape == b.shape and a.dtype == b.dtype and not on_pool(a)
    assert np.all(memory.empty(40000, object) == None)  # noqa: E711


@needs_pool
def test_a_piece_is_reused_only_after_every_view_is_gone():
    before = memory.stats()["in_use"]
    a = memory.empty((512, 128), np.float32)
    addr = a.ctypes.data
    assert memory.stats()["in_use"] == before + a.nbytes  # 256 KiB: a size class of its own
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


def test_size_classes_waste_less_than_an_eighth():
    rng = np.random.default_rng(0)
    sizes = np.concatenate([np.arange(memory.MIN_BYTES, memory.MIN_BYTES + 5000),
                            rng.integers(memory.MIN_BYTES, 1 << 32, 20000), 2 ** np.arange(16, 33)])
    prev = 0
    for n in np.unique(sizes).tolist():
        c = memory.size_class(n)
        assert n <= c < n + n / 8 and c % memory.ALIGN == 0 and c >= prev
        prev = c
    assert memory.size_class(memory.size_class(300_001)) == memory.size_class(300_001)


@needs_pool
def test_the_pool_stays_bounded_across_many_batch_sizes(pool):
    """64 batch sizes packed one after the other, each freed: one region serves them all, and once
    warmed nothing falls back to np.empty (the old pool mapped its whole cap and then fell back)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((64 * cpu.TB, 1024)).astype(np.float32)
    batches = rng.permutation(np.arange(1, 65) * cpu.TB - 5)  # 64 sizes of packed operand, 128 KiB to 8 MiB
    for _ in range(2):
        for b in batches:
            xp = cpu.pack_panels(x[:b])
            assert on_pool(xp)
            np.testing.assert_array_equal(xp[::97, :b], x[:b, ::97].T)
            del xp
            assert memory.stats()["mapped"] <= 16 * MiB
    s = memory.stats()
    assert s["in_use"] == 0 and s["mapped"] <= 16 * MiB


@needs_pool
def test_random_mixes_of_sizes_reuse_the_same_memory(pool):
    """Steps that each hold a few arrays of random sizes at once: the pool stays near the largest step."""
    rng = np.random.default_rng(2)
    peak = 0
    for _ in range(300):
        sizes = rng.integers(64 << 10, 4 * MiB, rng.integers(1, 6))
        live = [memory.empty(int(n), np.uint8) for n in sizes]
        assert all(on_pool(a) for a in live)
        peak = max(peak, int(sizes.sum()))
        del live
    s = memory.stats()
    assert s["in_use"] == 0 and s["mapped"] <= 2 * peak + memory.CHUNK


@needs_pool
@pytest.mark.parametrize("order", [[0, 1, 2], [2, 1, 0], [0, 2, 1]])
def test_freed_neighbours_coalesce_into_one_block(pool, order):
    """A region of 2 MiB pieces: freed in any order, three neighbours serve one 6 MiB request in the same region."""
    keep = memory.empty(2 * MiB, np.uint8)  # the region stays in use: it cannot simply be unmapped and mapped anew
    thirds = [memory.empty(2 * MiB, np.uint8) for _ in range(3)]
    base = min(a.ctypes.data for a in thirds)
    assert memory.stats()["regions"] == 1 and memory.stats()["mapped"] == memory.CHUNK
    for i in order:
        thirds[i] = None
    whole = memory.empty(6 * MiB, np.uint8)
    assert on_pool(whole) and whole.ctypes.data == base and not overlaps(whole, keep)
    assert memory.stats()["regions"] == 1 and memory.stats()["mapped"] == memory.CHUNK


@needs_pool
def test_trim_returns_what_no_live_array_needs_and_keeps_live_data(pool):
    p = pool.default
    arrays = {}
    for i, mb in enumerate([6, 6, 6, 1, 3, 0.5, 5]):  # several regions (two 6 MiB pieces do not share 8 MiB)
        a = memory.empty(int(mb * MiB) // 4, np.int32)
        assert on_pool(a)
        a[...] = np.arange(a.size, dtype=np.int32) * 7 + i
        arrays[i] = a
    del a
    assert memory.stats()["regions"] >= 3
    keep = arrays.pop(1)  # one 6 MiB array stays alive
    arrays.clear()
    mapped = memory.stats()["mapped"]
    released = memory.trim()
    s = memory.stats()
    assert released > 0 and s["mapped"] == mapped - released
    assert s["in_use"] == memory.size_class(keep.nbytes) and s["regions"] == 1 and s["mapped"] == memory.CHUNK
    np.testing.assert_array_equal(keep, np.arange(keep.size, dtype=np.int32) * 7 + 1)
    b = memory.empty(MiB, np.uint8)  # the pool still works, beside the live array, and maps again if it must
    c = memory.empty(7 * MiB, np.uint8)
    assert on_pool(b) and on_pool(c) and not overlaps(b, keep) and not overlaps(c, keep) and not overlaps(b, c)
    b[...] = 1
    c[...] = 2
    np.testing.assert_array_equal(keep, np.arange(keep.size, dtype=np.int32) * 7 + 1)
    del b, c, keep
    assert memory.trim() > 0 and p.stats()["mapped"] == 0 and p.stats()["in_use"] == 0
    assert memory.trim() == 0


@needs_pool
def test_pieces_are_never_handed_out_twice_across_size_classes(pool):
    rng = np.random.default_rng(3)
    live = []
    for it in range(2000):
        if live and (len(live) > 12 or rng.random() < 0.45):
            tag, a = live.pop(rng.integers(len(live)))
            assert np.all(a == tag)
            del a
        else:
            n = int(rng.choice([rng.integers(64 << 10, 600 << 10), rng.integers(600 << 10, 5 * MiB)]))
            a = memory.empty(n // 4, np.int32)
            assert on_pool(a)
            assert not any(overlaps(a, b) for _, b in live)
            a.fill(it)
            live.append((it, a))
        if it % 500 == 499:
            memory.trim()  # with pieces out: must unmap none of theirs
    for tag, a in live:
        assert np.all(a == tag)
    del a
    live.clear()
    assert memory.stats()["in_use"] == 0


@needs_pool
def test_threads_allocating_and_freeing_at_once_never_share_memory(pool):
    """8 threads take pieces of random sizes, fill them with their own tag, hand some to other threads to free,
    and check the tags; a registry of the live spans catches any piece handed out twice."""
    registry, reg_lock = {}, threading.Lock()
    handoff = queue.Queue()
    errors = []

    def register(a):
        lo, hi = span(a)
        with reg_lock:
            for (l2, h2) in registry:
                if lo < h2 and l2 < hi:
                    errors.append(f"overlap {lo:#x}-{hi:#x} with {l2:#x}-{h2:#x}")
            registry[(lo, hi)] = True

    def release(item):
        tag, a = item
        if not np.all(a == tag):
            errors.append(f"piece of tag {tag} was overwritten")
        with reg_lock:
            del registry[span(a)]

    def worker(t):
        rng = np.random.default_rng(100 + t)
        mine = []
        try:
            for it in range(1000):
                n = int(rng.integers(64 << 10, MiB if it % 4 else 3 * MiB)) // 4
                a = memory.empty(n, np.int32)
                tag = t * 100_000 + it
                a.fill(tag)
                register(a)
                mine.append((tag, a))
                del a
                if len(mine) > 4 or rng.random() < 0.3:
                    item = mine.pop(rng.integers(len(mine)))
                    if rng.random() < 0.5:
                        handoff.put(item)  # someone else frees it
                    else:
                        release(item)
                    del item
                try:
                    item = handoff.get_nowait()
                except queue.Empty:
                    pass
                else:
                    release(item)
                    del item
                if it % 8 == 7 and t < 2:
                    memory.trim()  # also empties the cache: the next takes cut from the free space
            for item in mine:
                release(item)
            mine.clear()
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often: inside take() and the pool's other sections too
    try:
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    finally:
        sys.setswitchinterval(interval)
    while not handoff.empty():
        release(handoff.get())
    assert not errors, errors[:5]
    s = memory.stats()
    assert s["in_use"] == 0 and s["mapped"] <= s["limit"]
    memory.trim()
    assert memory.stats()["mapped"] == 0


@needs_pool
def test_a_piece_freed_in_another_thread_comes_back(pool):
    box = [memory.empty((1024, 128), np.float32)]
    addr = box[0].ctypes.data
    th = threading.Thread(target=box.clear)  # the last reference dies over there
    th.start()
    th.join()
    assert memory.stats()["in_use"] == 0
    again = memory.empty((1024, 128), np.float32)
    assert again.ctypes.data == addr


@needs_pool
def test_returning_a_piece_never_waits_for_the_pool_lock(pool):
    """A piece can come back while its pool is busy (another thread, or this one: the GC runs anywhere)."""
    p = pool.default
    box = [memory.empty(MiB, np.uint8)]
    mine = memory.empty(MiB, np.uint8)
    th = threading.Thread(target=box.clear)
    with p._lock:  # a take() in progress
        th.start()
        th.join(timeout=10)
        assert not th.is_alive()
        del mine  # the same thread, lock held: must not deadlock
    assert memory.stats()["in_use"] == 0


@needs_pool
def test_pieces_freed_by_the_garbage_collector_in_the_middle_of_a_take(pool, monkeypatch):
    """The collector can run inside take() (any allocation may start it) and free pool arrays held by cycles: their
    pieces come back on this thread with the pool lock held, without a deadlock or a piece handed out twice."""
    import gc

    p = pool.default
    errors, returned_inside = [], []
    cut = p._cut

    def cut_after_a_gc_pass(size):  # take() has the lock here and no cached piece fits
        gc.collect(0)  # the young generation, where the cycles are
        returned_inside.append(len(p._returned))
        return cut(size)

    monkeypatch.setattr(p, "_cut", cut_after_a_gc_pass)

    def run():
        rng = np.random.default_rng(4)
        live = []
        try:
            for it in range(300):
                cycle = [memory.empty(int(rng.integers(64 << 10, 2 * MiB)), np.uint8)]
                cycle.append(cycle)  # only the collector frees this one
                del cycle
                a = memory.empty(int(rng.integers(64 << 10, 2 * MiB)), np.uint8)
                a.fill(it % 251)
                if any(overlaps(a, b) for _, b in live):
                    errors.append(f"overlap at step {it}")
                live.append((it % 251, a))
                del a
                if len(live) > 6:
                    tag, b = live.pop(0)
                    if not np.all(b == tag):
                        errors.append(f"piece {tag} overwritten")
                    del b
                if it % 20 == 19:
                    memory.trim()
            live.clear()
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    gc.disable()  # the cycles wait for the passes inside take()
    try:
        th = threading.Thread(target=run, daemon=True)
        th.start()
        th.join(timeout=30)
        assert not th.is_alive(), "deadlock: a piece returned during take() waited for the pool lock"
    finally:
        gc.enable()
    gc.collect()
    assert not errors, errors[:5]
    assert sum(returned_inside) > 50  # the scenario happened
    assert memory.stats()["in_use"] == 0


@needs_pool
def test_the_cap_bounds_mapped_and_frees_idle_regions_before_mapping(pool):
    p = pool(20 * MiB)
    held = [memory.empty(3 * MiB, np.uint8) for _ in range(8)]  # 24 MiB asked, 20 allowed
    n_on = sum(on_pool(a) for a in held)
    assert 4 <= n_on < 8 and memory.stats()["mapped"] <= 20 * MiB
    assert not on_pool(memory.empty(21 * MiB, np.uint8))  # larger than the cap: np.empty
    del held
    big = memory.empty(15 * MiB, np.uint8)  # fits only if the idle regions of 3 MiB pieces are unmapped first
    assert on_pool(big) and memory.stats()["mapped"] <= 20 * MiB
    assert p.stats()["fallbacks"] == 8 - n_on + 1
    big[...] = 5
    del big
    many = [memory.empty(MiB // 2, np.uint8) for _ in range(30)]  # all in the big region's free space
    assert all(on_pool(a) for a in many) and p.stats()["mapped"] <= 20 * MiB
    for a, b in zip(many, many[1:]):
        assert not overlaps(a, b)


def test_small_arrays_fall_back_to_numpy():
    small = memory.empty((4, 4), np.float32)
    assert not isinstance(small.base, memory._Piece) and small.shape == (4, 4)


def run_with(**env):
    code = "import fanin, numpy as np; from fanin.kernels import memory as m; " \
           "a = m.empty((1024, 128), np.float32); print(m.enabled(), type(a.base).__name__, m.stats()['limit'])"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FANIN_HUGEPAGE")} | env
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_pool_can_be_switched_off():
    assert run_with(FANIN_HUGEPAGES="0") == ["False", "NoneType", str(256 * MiB)]


@needs_pool
def test_the_cap_is_read_from_the_environment():
    assert run_with(FANIN_HUGEPAGE_POOL_MB="16") == ["True", "_Piece", str(16 * MiB)]


def test_packed_operands_are_the_same_on_and_off_the_pool(monkeypatch):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((100, 700)).astype(np.float32)
    on = cpu.pack_panels(x)
    monkeypatch.setattr(memory, "_ENABLED", False)
    off = cpu.pack_panels(x)
    np.testing.assert_array_equal(on, off)
    np.testing.assert_array_equal(on[:, :100], x.T)
    assert np.all(on[:, 100:] == 0)


@needs_pool
def test_a_forked_child_gets_a_pool_of_its_own_even_if_the_lock_was_held():
    import multiprocessing as mp

    keep = memory.empty((512, 128), np.float32)
    keep[...] = 3.0
    ctx = mp.get_context("fork")
    with memory._POOL._lock:  # another thread is inside take() at the fork
        q = ctx.Queue()
        p = ctx.Process(target=_child_allocates, args=(q, keep))
        p.start()
        p.join(30)
    assert p.exitcode == 0 and q.get(timeout=5) == (True, 3.0)


def _child_allocates(q, inherited):
    a = memory.empty((1024, 128), np.float32)  # would wait forever on the parent's held lock
    a[...] = 1.0
    q.put((isinstance(a.base, memory._Piece), float(inherited[0, 0])))
