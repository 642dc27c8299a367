"""What this process may use of its host, from the standard library only: read by the engine's setup
(CPU threads) and by `serve` before any model loads (how many HTTP front ends to fork)."""

from __future__ import annotations

import os
import sys


def usable_cpus() -> int:
    """CPUs this process may really run on: its affinity mask, capped by a cgroup v2 CPU quota
    (a container limited to 2 CPUs on a 64-core host still sees 64 cores in os.cpu_count())."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()
        if quota != "max":
            cpus = min(cpus, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota to honour
    return cpus


def can_watch_child_processes() -> bool:
    """Whether this process can hold pidfds of its children (Linux 5.3+, not blocked by a seccomp
    profile): `serve --api-server-count N` watches its forked front ends through them."""
    if sys.platform != "linux" or not hasattr(os, "pidfd_open"):
        return False
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:
        return False
    return True
