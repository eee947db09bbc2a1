"""A MetaSchedule runner that measures tuning candidates on farm servers, with bounded waits for
devices and re-measuring when a server is lost."""

from __future__ import annotations

import functools

from .base import FarmError, parse_tracker
from .session import request_session
from .status import servers_for, wait_for_server


def rpc_runner(
    tracker: str,
    key: str,
    session_timeout_sec: int = 60,
    wait_for_device_sec: float = 60.0,
    max_workers: int = 1,
    retries: int = 1,
    evaluator_config=None,
):
    """A MetaSchedule runner that measures candidates on farm servers of ``key``.

    Fails now with ``FarmError`` when the tracker lists no server for the key. During tuning,
    a candidate whose server dies is measured again on another one (``retries`` times); a
    request for a device waits at most ``wait_for_device_sec``; and when no server is left,
    the next batch waits that long for one to come back, then ``FarmError`` ends the job
    (``tune_relax`` raises it). ``session_timeout_sec`` bounds one candidate's measurement.
    """
    from tvm.s_tir.meta_schedule.runner import RPCConfig

    from ..tuning_workers import ignore_sigint

    host, port = parse_tracker(tracker)
    if not servers_for(tracker, key):
        raise FarmError(
            f"no live RPC server with key '{key}' on tracker {tracker}; "
            f"start one with `hwc farm serve --tracker {tracker} --key {key}`"
        )
    config = RPCConfig(host, port, key, session_priority=1, session_timeout_sec=session_timeout_sec)
    create = functools.partial(_create_session, tracker=tracker, wait_sec=wait_for_device_sec)
    return _runner_class()(
        rpc_config=config,
        evaluator_config=evaluator_config,
        f_create_session=create,
        max_workers=max_workers,
        initializer=ignore_sigint,  # Ctrl-C is the tuning process's to handle (tuning_workers)
        farm_tracker=tracker,
        farm_wait_sec=wait_for_device_sec,
        farm_retries=retries,
    )


def _create_session(rpc_config, tracker: str, wait_sec: float):
    """``RPCRunner``'s session factory, run in its worker process: a bounded request."""
    return request_session(tracker, rpc_config.tracker_key, wait_sec, rpc_config.session_timeout_sec, rpc_config.session_priority)


def _measure(retries: int, *args):
    """TVM's RPC measurement, repeated on another server when it fails for a reason other than
    the candidate running past its session time (a server lost mid-way, most often)."""
    from tvm.s_tir.meta_schedule.runner.rpc_runner import _worker_func

    for attempt in range(retries + 1):
        try:
            return _worker_func(*args)
        except FarmError:
            raise
        except Exception as e:  # TVM reports a lost connection as a plain error
            if attempt == retries or "RPCSessionTimeoutError" in str(e):
                raise
    raise AssertionError("unreachable")


@functools.cache
def _runner_class():
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.runner import RPCRunner
    from tvm.s_tir.meta_schedule.runner.rpc_runner import RPCRunnerFuture
    from tvm_ffi import register_error

    # lets a FarmError raised in run() reach the caller of tune_relax as FarmError, not RuntimeError
    register_error(FarmError)

    @derived_object
    class FarmRunner(RPCRunner._cls):  # derived objects are extended through _cls
        """``RPCRunner`` with bounded waits for devices and re-measuring on server loss."""

        def __init__(self, *args, farm_tracker: str, farm_wait_sec: float, farm_retries: int, max_workers: int = 1, **kwargs):
            super().__init__(*args, max_workers=max_workers, **kwargs)
            self.farm_tracker = farm_tracker
            self.farm_wait_sec = farm_wait_sec
            self.farm_retries = farm_retries
            # TVM gives the runner's pool no timeout: a server that vanishes without closing its
            # socket (a powered-off board) would block the job forever
            self.pool._timeout = (farm_retries + 1) * (self.rpc_config.session_timeout_sec + farm_wait_sec) + 30

        def run(self, runner_inputs):
            wait_for_server(self.farm_tracker, self.rpc_config.tracker_key, self.farm_wait_sec)
            futures = []
            for runner_input in runner_inputs:
                future = self.pool.submit(
                    _measure,
                    self.farm_retries,
                    self.f_create_session,
                    self.f_upload_module,
                    self.f_alloc_argument,
                    self.f_run_evaluator,
                    self.f_cleanup,
                    self.rpc_config,
                    self.evaluator_config,
                    self.alloc_repeat,
                    str(runner_input.artifact_path),
                    str(runner_input.device_type),
                    tuple(arg_info.as_json() for arg_info in runner_input.args_info),
                )
                futures.append(RPCRunnerFuture(future=future, timeout_sec=self.pool._timeout))
            return futures

    return FarmRunner
