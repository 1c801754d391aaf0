"""How many threads torch should use for a command.

torch's default is every core the machine shows, which is wrong in a container or a batch job limited to fewer
(a 2-CPU quota on a 64-core host would run 64 threads on 2 CPUs).  The command line sets the count from the cores
this process may actually use: its CPU affinity, capped by its cgroup's CPU quota.  A user's ``OMP_NUM_THREADS``
always wins, and the library itself (``from ligo_convert import ...``) never changes the thread count.

On a shared machine the cores are not all free: with other processes runnable, a team of OpenMP threads, one per
core, waits at every barrier for its slowest member, which the scheduler has preempted; for the many small operations
of a micro model that made the default 3-20x slower than one thread (benchmarks/results/threads.md).  So the
default also leaves out the cores other processes keep busy when the command starts (at least one thread), and
onnxruntime sessions the tool opens use the same count (``session_threads``).
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


def _my_cpus() -> set[int]:
    """The CPUs this process may run on (its affinity mask; every CPU where that is unknown)."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def usable_cores(root: Path = CGROUP_ROOT) -> int:
    """The cores this process may run on: its affinity mask, capped by the cgroup's CPU quota (at least 1)."""
    cores = len(_my_cpus())
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


def _cpu_times(stat: Path, cpus: set[int]) -> tuple[int, int] | None:
    """(all, idle) clock ticks so far summed over ``cpus`` (the per-CPU lines of /proc/stat), or None."""
    total = idle = 0
    seen = False
    try:
        for line in stat.read_text().splitlines():
            name, *fields = line.split()
            if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
                ticks = [int(x) for x in fields[:8]]
                total += sum(ticks)
                idle += ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
                seen = True
    except (OSError, ValueError, IndexError):
        return None
    return (total, idle) if seen else None


def busy_elsewhere(stat: Path = PROC_STAT, samples: int = 6, interval: float = 0.01) -> int:
    """Cores other processes keep busy right now, by two readings over a short window (~50 ms) while this process
    sleeps: the median of the kernel's runnable count less this process's one thread, and the busy time of the CPUs
    this process may use (a multi-threaded job parks its threads between parallel regions, so the runnable count
    alone can miss it; the busy time can miss a job that just woke).  The larger of the two; 0 when unknown."""
    cpus = _my_cpus()
    first = _cpu_times(stat, cpus)
    counts = []
    for i in range(samples):
        n = _procs_running(stat)
        if n is not None:
            counts.append(n)
        if i + 1 < samples:
            time.sleep(interval)
    last = _cpu_times(stat, cpus)
    runnable = max(0, math.floor(statistics.median(counts)) - 1) if counts else 0
    busy_time = 0
    if first and last and last[0] > first[0]:
        busy_cpus = len(cpus) * (1 - (last[1] - first[1]) / (last[0] - first[0]))
        busy_time = max(0, round(busy_cpus))  # a core more than half busy counts as taken
    return max(runnable, busy_time)


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


def session_threads() -> int:
    """Threads for an onnxruntime session the tool opens: torch's count (what ``configure`` chose for a command,
    the caller's own setting for library use), since onnxruntime's default (every physical core, spinning between
    runs) collapses on a shared machine the same way."""
    import torch

    return max(1, torch.get_num_threads())
