"""How many threads the TVM runtime runs kernels on in this process (and its workers).

TVM's thread pool, unless ``TVM_NUM_THREADS`` or ``OMP_NUM_THREADS`` says otherwise, uses
*half* the logical CPUs on x86 (it assumes two hyper-threads per core). On a VM whose vCPUs
are whole cores (the 2-core CI and benchmark hosts) that is one thread: every parallel loop ran
serially, and hwc measured at half the speed it has. ``use_all_cores()`` sets
``TVM_NUM_THREADS`` to the CPUs this process may run on, unless the user chose a number; it
must run before the first kernel runs in the process (the pool reads the variable once), and
worker processes started afterwards (tuning builders and runners, farm servers) inherit it.
"""

from __future__ import annotations

import os

_VARS = ("TVM_NUM_THREADS", "OMP_NUM_THREADS")


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask), at least 1."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except (AttributeError, OSError):  # no affinity API on this platform
        return max(os.cpu_count() or 1, 1)


def use_all_cores() -> int:
    """Set ``TVM_NUM_THREADS`` to ``available_cpus()`` unless it or ``OMP_NUM_THREADS`` is set;
    returns the thread count the runtime will use."""
    for var in _VARS:
        value = os.environ.get(var, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    n = available_cpus()
    os.environ["TVM_NUM_THREADS"] = str(n)
    return n
