"""Pieces shared by the backends."""

from __future__ import annotations

import contextlib


def vm_finalize_pipeline(pipeline_module):
    """The VM lowering + finalization passes of one of TVM's backend pipeline modules,
    without its legalization and fusion (those ran already in ``build.legalize``)."""
    import tvm

    def make(target):
        @tvm.transform.module_pass(opt_level=0, name="HwcFinalize")
        def _finalize(mod, _ctx):
            with target:
                seq = tvm.transform.Sequential(
                    pipeline_module.dataflow_lower_passes(target) + pipeline_module.finalize_passes(target)
                )
                return seq(mod)

        return _finalize

    return make


def attempt(primitive, *args) -> bool:
    """Apply a schedule primitive where it is legal: True if it applied; False if it raised
    (a ``ScheduleError``: the schedule is unchanged)."""
    try:
        primitive(*args)
        return True
    except Exception:
        return False


@contextlib.contextmanager
def no_context(_spec):
    yield
