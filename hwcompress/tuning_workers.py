"""The processes of a tuning run: the candidate builder and runner workers, and Ctrl-C.

MetaSchedule runs its search in C++ and calls back into Python for building and measuring in
worker processes (``tvm.exec.popen_worker``). A Ctrl-C must neither kill a worker mid-candidate
nor raise inside a callback (see ``CtrlC``); the tuning process stops the loop between batches
and kills the workers itself.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

# MetaSchedule's default 30 s builder timeout fails candidates on a busy 2-core machine
BUILD_TIMEOUT_S = 120


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class StopAfterBatch(Exception):
    """Raised by the progress callback after a batch, once Ctrl-C asked to stop."""


class CtrlC:
    """SIGINT handling around the tuning loop (main thread only; the old handler is put back).

    Python's own handler raises KeyboardInterrupt in whatever callback MetaSchedule's C++ loop
    is running; tvm-ffi's conversion of that exception aborted the process ("corrupted
    double-linked list") in our tests. So the handler never raises: the first press sets
    ``requested`` and the progress callback raises a plain exception after the batch being
    measured (the database and the state file stay in step); the second press runs
    ``stop_now`` (save the state, kill the workers) and ends the process with exit code 130.
    """

    def __init__(self, stop_now):
        self.requested = False
        self._stop_now = stop_now
        self._old = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *_exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
            self._old = None

    def _handle(self, _signum, _frame) -> None:
        if not self.requested:
            self.requested = True
            _stderr("hwc tune: stopping after the current batch (its results are kept); Ctrl-C again to stop now")
            return
        try:
            self._stop_now()
        finally:
            _stderr("hwc tune: stopped now; the work dir keeps what was measured, run the same command to resume")
            os._exit(130)  # unwinding through the C++ loop is what is unsafe (see above)


def kill_workers() -> int:
    """Kill MetaSchedule's builder and runner worker processes (``tvm.exec.popen_worker``
    children of this process, with their own children, e.g. a compiler). Returns how many."""
    import psutil

    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        return 0
    doomed = []
    for child in children:
        try:
            if "tvm.exec.popen_worker" in " ".join(child.cmdline()):
                doomed += [child, *child.children(recursive=True)]
        except psutil.Error:  # already gone
            continue
    for proc in doomed:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(doomed, timeout=5)
    return len(doomed)


def build_candidate(mod, target, _params):
    """MetaSchedule's default candidate build without its ``import tvm.s_tir.tensor_intrin``:
    that import parses hundreds of TVMScript functions (~30 s of CPU) in every batch's fresh
    build worker. (Tensorizing schedule rules, e.g. for INT8 dot products, will need it.)
    The default schedules' prefetch annotations become prefetches, as in ``hwc build``."""
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    from .backends.cpu_prefetch import inject_prefetch

    mod = inject_prefetch()(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod))
    return tvm_build(mod, target=target)


def import_tensor_intrin() -> None:
    """``import tvm.s_tir.tensor_intrin`` (MetaSchedule's ``TuneContext`` does it) in seconds,
    not minutes: its hundreds of ``@T.prim_func`` each call ``inspect.stack()``, whose
    ``getmodule`` scans every loaded module for every frame (89 s on a 2-core machine with
    tuning's ~2,000 modules, 6 s with ``_cheap_stack``). Only the import runs with it."""
    import inspect

    if "tvm.s_tir.tensor_intrin" in sys.modules:
        return
    real = inspect.stack
    inspect.stack = _cheap_stack
    try:
        import tvm.s_tir.tensor_intrin  # noqa: F401
    finally:
        inspect.stack = real


def _cheap_stack(context: int = 1) -> list:
    """``inspect.stack(context)`` as TVMScript's parser reads it (frames, file, line, the
    current source line), with the line from ``linecache`` instead of ``getsourcefile``."""
    import inspect
    import linecache

    frames, frame = [], sys._getframe(1)
    while frame is not None:
        code, lineno = frame.f_code, frame.f_lineno
        line = linecache.getline(code.co_filename, lineno) if context > 0 else ""
        frames.append(inspect.FrameInfo(frame, code.co_filename, lineno, code.co_name, [line] if line else None, 0 if line else None))
        frame = frame.f_back
    return frames


def candidate_builder():
    """The builder tuning uses: ``build_candidate`` with a timeout that a busy machine meets."""
    from tvm.s_tir import meta_schedule as ms

    return ms.builder.LocalBuilder(timeout_sec=BUILD_TIMEOUT_S, f_build=build_candidate, initializer=ignore_sigint)


def ignore_sigint() -> None:
    """Worker initializer: Ctrl-C in a terminal signals the whole process group, and a worker
    that died of it would fail the candidate it was building or measuring; the tuning process
    decides when to stop (see ``CtrlC``) and kills the workers itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def quiet_metaschedule_console() -> None:
    """MetaSchedule prints a full statistics table per batch to stdout at INFO; its log files
    in ``work_dir/logs`` keep everything, the console gets our one-line progress instead.

    Also drops unnamed handlers from its logger: MetaSchedule's logging setup lists handlers
    by name, and an unnamed one (pytest's capture handler) makes a second tuning run in the
    same process fail with "'NoneType' object has no attribute 'format'".
    """
    logger = logging.getLogger("tvm.s_tir.meta_schedule")
    for handler in [h for h in logger.handlers if h.get_name() is None]:
        logger.removeHandler(handler)
    if logger.level in (logging.NOTSET, logging.DEBUG, logging.INFO):
        logger.setLevel(logging.WARNING)
