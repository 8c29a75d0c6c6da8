"""Which kernels, with which signatures, the CUDA dispatcher launches -- and their PTX (no GPU needed).

``record()`` runs every driver of ``fanin.kernels.cuda`` (and the device training/inference helpers) on tiny shapes
under Numba's simulator with launches switched off (``Kernel.DRY``), collecting the (kernel key, argument types) of
every launch: exactly what the dispatcher would compile on a GPU. ``compile_ptx(records, cc)`` then compiles each
one to PTX with NVVM (the ``cuda`` extra ships it), outside the simulator, for a compute capability such as
``(9, 0)`` (H100) or ``(8, 0)`` (A100). The tile kernels are compiled in their 8-warp configuration as
well as in the one the small shapes recorded, and the panel kernel (what large layers use on a GPU) in
``PANEL_PLAN``'s.

    NUMBA_ENABLE_CUDASIM=1 python -m fanin.kernels.cuda_ptx > records.json   # record
    python -m fanin.kernels.cuda_ptx --compile records.json                  # compile for sm_80 and sm_90
"""
from __future__ import annotations

import json
import sys
import time

import numpy as np


def record() -> list:
    """Unique ``(key, argument descriptions)`` of the launches of every dispatcher path (under the simulator)."""
    from numba import cuda

    import fanin
    from fanin import device
    from fanin import kernels as KK
    from fanin.kernels import cuda as C
    from fanin.kernels import cuda_kernels as K

    K.Kernel.RECORD, K.Kernel.DRY = [], True
    try:
        rng = np.random.default_rng(0)
        for dt in (np.float32, np.float64):
            for idt in (np.int16, np.int32):
                n_in, n_out, k = 20, 6, 4
                idx = np.sort(np.stack([rng.choice(n_in, k, replace=False) for _ in range(n_out)]), axis=1).astype(idt)
                topo = KK.Topology(idx, n_in)
                vals = cuda.to_device(rng.standard_normal((n_out, k)).astype(dt))
                didx = cuda.to_device(idx)
                for B in (1, 9, 40):
                    x = cuda.to_device(rng.standard_normal((B, n_in)).astype(dt))
                    dy = cuda.to_device(rng.standard_normal((B, n_out)).astype(dt))
                    for ind in (topo.indices, didx):
                        C.fanin_forward(x, ind, vals, cuda.to_device(np.zeros(n_out, dt)))
                        C.fanin_backward(x, ind, vals, dy, transposed=topo.transposed() if ind is topo.indices else None)
                    if B >= C.SMALL_BATCH:
                        xp, dyp = C.pack_panels(x), C.pack_panels(dy)
                        C.unpack_panels(xp, B)
                        C.fanin_forward(x, topo.indices, vals, xp=xp)
                        C.fanin_backward_values(x, topo.indices, dy, xp=xp, dyp=dyp)
                        C.fanin_backward_input(topo.indices, vals, dy, n_in, dyp=dyp, transposed=topo.transposed())
                        C.forward_panels(xp, B, topo.indices, vals)
                        C.backward_input_panels(topo.indices, vals, dyp, B, n_in, topo.transposed())
                        C.backward_values_panels(xp, topo.indices, dyp)
                    if dt == np.float32:
                        q8 = cuda.to_device(rng.integers(-100, 100, (n_out, k)).astype(np.int8))
                        q4 = cuda.to_device(np.zeros((n_out, k // 2), np.uint8))
                        sc = cuda.to_device(np.ones(n_out, np.float32))
                        C.fixed_point_forward(x, topo.indices, q8, sc)
                        C.fixed_point_forward4(x, topo.indices, q4, k, sc)
                        C.growth_candidates(x, dy, topo.indices, 5, sort=False, held=True)
                C.index_min_max(didx)
                C.rows_strictly_increasing(didx)
                C.transpose_structure(didx, n_in)
            x = cuda.to_device(rng.standard_normal((3, 5)).astype(dt))
            C.dense_grad(x, x)
            C.concat_rows([x, x])
            C.astype(x, np.float32 if dt == np.float64 else np.float64)
            xi = cuda.to_device(rng.standard_normal((1, 2, 4, 4)).astype(dt))
            cols = C.im2col(xi, 3, 3, (1, 1), (1, 1), 4, 4)
            C.col2im(cols, (1, 2, 4, 4), 3, 3, (1, 1), (1, 1), 4, 4)
        # the device autograd ops and updates of a training step, float32 (what fanin.device launches)
        x = cuda.to_device(rng.standard_normal((9, 5)).astype(np.float32))
        lab = cuda.to_device(np.zeros(9, np.int64))
        for op in (0, 1, 2):
            C.binary(x, C.flat(x)[:5], op)
            C.binary(C.flat(x)[:1], x, op)
        C.axpy(x, x, 2.0)
        g = C.total(x, 0.5)
        C.scale_scalar(g, (9, 5), np.float32, 1.0)
        C.relu_grad(x, C.relu(x))
        C.colsum(x)
        loss, logp = C.cross_entropy(x, lab)
        C.cross_entropy_backward(logp, lab, loss)
        C.zero_rows(C.copy(x), C.mask_of(np.ones(9, bool)))
        C.gemm(C.flat(x), 5, 1, C.flat(x), 1, 5, C.flat(C.empty((9, 9), np.float32)), 9, 9, 9, 5,
               bias=C.empty((9,), np.float32))
        m = C.zeros((9, 5), np.float32)
        C.sgd_update(x, x, m, 0.1, 0.9, 0.0, True)
        C.adam_update(x, x, m, m, 0.1, 0.9, 0.999, 1e-8, 0.0, 1.0)
        C.full((3,), np.float64, 1.0)
        assert fanin is not None and device is not None
        recs = K.Kernel.RECORD
    finally:
        K.Kernel.RECORD, K.Kernel.DRY = None, False
    seen, out = set(), []
    for key, desc in recs:
        item = (tuple(key), tuple(tuple(d) for d in desc))
        if item not in seen:
            seen.add(item)
            out.append([list(key), [list(d) for d in desc]])
    return out


def variants(records) -> list:
    """The records, plus the 8-warp configuration of every tile kernel and the panel kernel of ``PANEL_PLAN`` (what
    large layers use on a GPU)."""
    from fanin.kernels import cuda_kernels as K

    out, seen = [], set()
    for key, desc in records:
        keys = [tuple(key)]
        if key[0] in ("tile", "dvals"):
            keys.append((key[0], key[1], 8, 8, *key[4:]))
        if key[0] == "tile":  # large layers' panel kernel (fanin.kernels.cuda.PANEL_PLAN): the same arguments
            spl, warps, rpw, smem = K.DEFAULT_PANEL_PLAN
            ch = K.panel_geometry(spl, warps, rpw, smem, np.dtype(key[-1]))[3]
            keys.append(("panel", spl, warps, rpw, ch, *key[4:]))
        if key[0] == "topc":  # the simulator records 32 threads a row; a GPU launches 256
            keys = [("topc", 256)]
        for k2 in keys:
            item = (k2, tuple(tuple(d) for d in desc))
            if item not in seen:
                seen.add(item)
                out.append((k2, desc))
    return out


def compile_ptx(records, cc=(9, 0)):
    """PTX text per record (outside the simulator): ``[(key, signature, ptx)]``."""
    from numba import cuda

    from fanin.kernels import cuda_kernels as K

    out = []
    for key, desc in variants(records):
        kern = K.build(tuple(key)).kern
        sig = K.signature(desc)
        ptx, _ = cuda.compile_ptx(kern.py_func, sig, cc=cc)
        out.append((tuple(key), sig, ptx))
    return out


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--compile"]:
        records = json.load(open(argv[1]))
        for cc in ((8, 0), (9, 0)):
            t = time.perf_counter()
            res = compile_ptx(records, cc)
            print(f"sm_{cc[0]}{cc[1]}: {len(res)} kernels compiled in {time.perf_counter() - t:.1f} s")
        return
    json.dump(record(), sys.stdout)


if __name__ == "__main__":
    main()
