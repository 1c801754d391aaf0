"""How many threads torch should use for a command.

torch's default is every core the machine shows, which is wrong in a container or a batch job limited to fewer
(a 2-CPU quota on a 64-core host would run 64 threads on 2 CPUs).  The command line sets the count from the cores
this process may actually use: its CPU affinity, capped by its cgroup's CPU quota.  A user's ``OMP_NUM_THREADS``
always wins, and the library itself (``from ligo_convert import ...``) never changes the thread count.

On a shared machine the cores are not all free: with other processes runnable, a team of OpenMP threads, one per
core, waits at every barrier for its slowest member, which the scheduler has preempted; for the many small operations
of a micro model that made the default 3-20x slower than one thread (benchmarks/results/threads.md).  So the
default also leaves out the cores other processes keep busy when the command starts (at least one thread).
"""

from __future__ import annotations

import math
import os
import statistics
import time
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_STAT = Path("/proc/stat")


def _cgroup_quota(root: Path = CGROUP_ROOT) -> float | None:
    """CPUs the cgroup may use (quota / period), or None when unlimited or unknown."""
    try:  # cgroup v2: "max 100000" or "200000 100000"
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:  # cgroup v1
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def usable_cores(root: Path = CGROUP_ROOT) -> int:
    """The cores this process may run on: its affinity mask, capped by the cgroup's CPU quota (at least 1)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = _cgroup_quota(root)
    if quota is not None:
        cores = min(cores, max(1, math.floor(quota)))
    return max(1, cores)


def _procs_running(stat: Path) -> int | None:
    try:
        for line in stat.read_text().splitlines():
            if line.startswith("procs_running "):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def busy_elsewhere(stat: Path = PROC_STAT, samples: int = 5, interval: float = 0.004) -> int:
    """Threads of other processes runnable right now: the median of a few samples of the kernel's runnable count
    (one sample is noisy), less this process's one running thread; 0 when unknown."""
    counts = []
    for i in range(samples):
        n = _procs_running(stat)
        if n is None:
            return 0
        counts.append(n)
        if i + 1 < samples:
            time.sleep(interval)
    return max(0, math.floor(statistics.median(counts)) - 1)


def default_threads(cores: int, busy: int) -> int:
    """The cores left free by ``busy`` other runnable threads, at least one and at most ``cores``."""
    return max(1, min(cores, cores - busy))


def configure(environ=os.environ) -> int | None:
    """Use the usable cores other processes leave free (for a command, not for library use); returns the count,
    or None when the user chose one with OMP_NUM_THREADS."""
    if environ.get("OMP_NUM_THREADS"):
        return None
    import torch

    n = default_threads(usable_cores(), busy_elsewhere())
    torch.set_num_threads(n)
    return n
