"""How many CPUs this process may really use (affinity and cgroup quota), and how pools' workers
share them with the event loop."""

from __future__ import annotations

import math
import os
from pathlib import Path

__all__ = ["batch_policy", "usable_cpus"]


def batch_policy() -> bool:
    """Run this thread, and the threads it starts from now on, under ``SCHED_BATCH`` (Linux):
    the scheduler's policy for CPU-bound work, as fair as the default one, but a batch task
    woken up does not preempt the task running where it lands. The event loop wakes a pool's
    worker (a process, or a thread) for each call, and on a busy machine the kernel often
    wakes it on the loop's own core: under the default policy it took the core from the loop
    at once, which then sat behind it (up to the next scheduler tick, 4 ms, while the other
    core idled). Measured here with two workers computing an mlp pair in turn with each
    policy: the loop's 1 ms heartbeat was late by 3.1-4.3 ms at p99, against 2.3-2.7 ms with
    ``SCHED_BATCH`` (processes; threads 2.3-3.2 against 1.5-2.5 ms), and the parent's eventfd
    write that wakes a worker process returned after 1 ms on average (preempted), against
    50-90 us; the pair's time and a tiny call's did not move. The loop still preempts a worker
    when it wakes. Returns whether the policy was set.

    Example: ``batch_policy()`` (in a pool's worker, before torch starts threads there)."""
    setscheduler = getattr(os, "sched_setscheduler", None)
    policy = getattr(os, "SCHED_BATCH", None)
    if setscheduler is None or policy is None:
        return False  # not Linux
    try:
        setscheduler(0, policy, os.sched_param(0))
    except OSError:  # refused (a seccomp profile, say): the default policy is still correct
        return False
    return True


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
