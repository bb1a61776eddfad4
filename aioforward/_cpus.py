"""How many CPUs this process may really use (affinity and cgroup quota)."""

from __future__ import annotations

import math
import os
from pathlib import Path

__all__ = ["usable_cpus"]


def _cgroup_quota() -> float | None:
    """CPU quota of this process's cgroup, in CPUs, or None when unlimited/unknown."""
    try:  # cgroup v2
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            return int(quota) / int(period)
        return None
    except (OSError, ValueError):
        pass
    try:  # cgroup v1
        q = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        p = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return q / p if q > 0 and p > 0 else None
    except (OSError, ValueError):
        return None


def usable_cpus() -> int:
    """The CPUs this process may use: affinity mask, capped by the cgroup quota.

    ``os.cpu_count()`` reports the host's CPUs, which oversubscribes a
    container. Example::

        >>> usable_cpus() >= 1
        True
    """
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        n = min(n, max(1, math.ceil(quota)))
    return max(1, n)
