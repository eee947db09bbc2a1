"""Default CPU schedules for kernels that no tuning database covers.

Placeholder until the default-schedule work lands: leaves kernels as TVM legalized them."""

from __future__ import annotations


def default_cpu_schedule(target):
    import tvm

    return tvm.transform.Sequential([])
