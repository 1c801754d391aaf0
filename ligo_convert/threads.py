"""How many threads torch should use for a command.

torch's default is every core the machine shows, which is wrong in a container or a batch job limited to fewer
(a 2-CPU quota on a 64-core host would run 64 threads on 2 CPUs).  The command line sets the count from the cores
this process may actually use: its CPU affinity, capped by its cgroup's CPU quota.  A user's ``OMP_NUM_THREADS``
always wins, and the library itself (``from ligo_convert import ...``) never changes the thread count.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


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


def configure(environ=os.environ) -> int | None:
    """Use ``usable_cores()`` threads (for a command, not for library use); returns the count, or None when the
    user chose one with OMP_NUM_THREADS."""
    if environ.get("OMP_NUM_THREADS"):
        return None
    import torch

    n = usable_cores()
    torch.set_num_threads(n)
    return n
