"""Data-parallel training over MPI, and sweeps on a Dask cluster (the ``distributed`` extra; docs/DISTRIBUTED.md).

    mpiexec -n 4 fanin train ... --distributed                       # or srun -n 4 on Slurm
    fanin.train.fit(model, opt, train, comm=MPI.COMM_WORLD)          # the same from Python
    fanin.distributed.sweep(cells, fn, cache="runs")                 # Dask: a LocalCluster, or scheduler="tcp://host:8786"

``DataParallel`` (``fanin.distributed.mpi``) is what the training loop talks to: each rank's shard of a batch,
one allreduce per step, the rows SRigL's growth scores read, the checks that the ranks agree, and a watchdog.
``sweep`` / ``run_commands`` (``fanin.distributed.sweeps``) submit independent runs to Dask workers.

This module itself imports neither NumPy nor MPI, so that ``world()`` can pin each rank's threads (BLAS reads
its thread count when NumPy loads) before anything else does.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys

__all__ = ["DistributedError", "RanksDiverged", "world", "launched_by_mpi", "data_parallel", "DataParallel", "sweep",
           "SweepError", "run_commands", "DEFAULT_TIMEOUT"]

DEFAULT_TIMEOUT = 300.0  # seconds a rank may wait in one collective before the job is aborted
LAUNCH = "mpiexec -n 2 fanin train ... --distributed"
# set by the launchers a rank may come from: MPICH/Intel (Hydra), Open MPI, PMIx (Open MPI 5, srun --mpi=pmix)
_LAUNCHER_ENV = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS")
_LAZY = {"DataParallel": "fanin.distributed.mpi", "RanksDiverged": "fanin.distributed.mpi",
         "sweep": "fanin.distributed.sweeps", "run_commands": "fanin.distributed.sweeps",
         "SweepError": "fanin.distributed.sweeps"}


class DistributedError(RuntimeError):
    """Distributed training cannot start (no MPI, no launcher); the message says how to launch."""


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fanin.distributed' has no attribute {name!r}")


def launched_by_mpi() -> bool:
    """Whether an MPI launcher (mpiexec/mpirun, srun with PMI/PMIx) started this process."""
    return any(k in os.environ for k in _LAUNCHER_ENV)


def _mpi():
    """mpi4py's MPI module (initialising MPI), or a DistributedError saying how to get it."""
    hint = (f"pip install 'fanin[distributed]' (mpi4py and MPICH's mpiexec; on a cluster, mpi4py built for the "
            f"site's MPI), then launch with `{LAUNCH}`")
    if importlib.util.find_spec("mpi4py") is None:
        raise DistributedError(f"--distributed needs mpi4py and an MPI library: {hint}.")
    try:
        from mpi4py import MPI
    except (ImportError, RuntimeError, OSError) as exc:  # mpi4py without a loadable libmpi
        raise DistributedError(f"--distributed: mpi4py cannot load an MPI library ({exc}); {hint}.") from None
    return MPI


def _cpus() -> frozenset:
    """The CPUs this process may run on (a Slurm or mpirun binding, taskset, a container's cpuset)."""
    try:
        return frozenset(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return frozenset(range(os.cpu_count() or 1))


def rank_threads(comm, MPI) -> int:
    """This rank's share of its CPUs: its CPU set divided by the ranks on this machine whose sets overlap it
    (unbound ranks share all cores; ranks the launcher bound to disjoint sets keep theirs)."""
    mine = _cpus()
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        sharing = sum(1 for other in local.allgather(mine) if other & mine)
    finally:
        local.Free()
    return max(1, len(mine) // max(1, sharing))


def pin_threads(threads: int) -> int:
    """Give this process ``threads`` threads for Numba, OpenMP and OpenBLAS, unless the user set them
    (NUMBA_NUM_THREADS, OMP_NUM_THREADS, OPENBLAS_NUM_THREADS); returns the Numba thread count. Before NumPy
    loads, the BLAS one takes effect; Numba's is set now if Numba is loaded."""
    for key in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(key, str(threads))
    n = int(os.environ["NUMBA_NUM_THREADS"])
    if "numba" in sys.modules:
        import numba

        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    return n


def world(timeout: float = DEFAULT_TIMEOUT, threads: int | None = None, excepthook: bool = True):
    """This MPI job's ``COMM_WORLD`` as a ``DataParallel``, after pinning this rank's threads (``threads``, default
    ``rank_threads``: its CPUs divided by the ranks sharing them).

    A ``DistributedError`` (one sentence: how to install or launch) when mpi4py or an MPI library is missing, or
    when the process was not started by an MPI launcher (a lone process would train alone and silently).
    ``excepthook``: an uncaught exception in any rank aborts the whole job (MPI_Abort) instead of leaving the
    other ranks waiting; for programs that own their process (``fanin train`` does).
    """
    MPI = _mpi()
    comm = MPI.COMM_WORLD
    if comm.Get_size() == 1 and not launched_by_mpi():
        raise DistributedError(f"--distributed: this process was not started by an MPI launcher; run `{LAUNCH}` "
                               "(Slurm: `srun -n 2 fanin train ... --distributed`), or drop --distributed.")
    pin_threads(threads or rank_threads(comm, MPI))
    from fanin.distributed.mpi import DataParallel

    dp = DataParallel(comm, timeout=timeout)
    if excepthook:
        dp.install_excepthook()
    return dp


def data_parallel(comm, timeout: float = DEFAULT_TIMEOUT):
    """``comm`` as a ``DataParallel``: an mpi4py communicator is wrapped, a ``DataParallel`` returned as is."""
    from fanin.distributed.mpi import DataParallel

    return comm if isinstance(comm, DataParallel) else DataParallel(comm, timeout=timeout)
