"""Default CPU schedules for kernels that no tuning database covers.

``default_cpu_schedule(target)`` returns a module pass that schedules every PrimFunc not yet
marked ``tirx.is_scheduled`` (or the older spelling ``tir.is_scheduled``), trying rules from
the most specialized to the simplest and keeping the first whose schedule applies and lowers:

0. ``packed_conv`` and ``winograd``: the kernels that the backend's own conv lowering
   (``cpu_conv``: NHWC conv with a packed weight) and the Winograd pass emit, recognised by
   their blocks' annotations (``hwc.conv_tile``, ``hwc.winograd``).
1. ``tiled_reduction``: a register-tiled schedule of the one reduction block (conv2d, matmul /
   dense / GEMV, pooling) with its padding producers and elementwise epilogue.
2. ``per_block``: inline injective producers, then parallelize + vectorize every remaining
   block (softmax, mean, transpose, reshape, pad, elementwise).
3. ``per_block`` without inlining; failing that, the kernel is left as TVM legalized it.

The rules themselves, and what each does in detail, live in ``cpu_rules``.

Every rule works on a fresh ``Schedule``; the primitives check legality themselves, so a rule
either yields a schedule equivalent to the input or raises and the next rule is tried.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .cpu_conv import schedule_packed_conv
from .cpu_int8 import schedule_int8
from .cpu_int8_winograd import schedule_int8_winograd
from .cpu_rules import per_block, tiled_reduction
from .cpu_winograd import schedule_winograd
from .cpu_intrin import DotIntrin, dot_intrin_for, target_has

log = logging.getLogger(__name__)

# Accumulator vectors in the register tile; leaves room for operands among the 16 (AVX2,
# NEON: 32 but the same budget works) or 32 (AVX-512) vector registers.
_ACC_REGS_16 = 12
_ACC_REGS_32 = 24
_SCHEDULED_ATTRS = ("tirx.is_scheduled", "tir.is_scheduled")


@dataclass(frozen=True)
class CpuFacts:
    """What the schedules need to know about the CPU."""

    num_cores: int
    vector_bits: int
    int8_dot: DotIntrin | None = None  # the int8 kernels' dot instruction (cpu_int8); None: none
    prefetch_bytes: int = 0  # how far ahead streamed weights are prefetched (cpu_prefetch.distance_for); 0: not

    def __post_init__(self):
        if self.num_cores < 1 or self.vector_bits < 64:
            raise ValueError(f"bad CPU facts: {self}")

    @classmethod
    def from_target(cls, target) -> "CpuFacts":
        from .cpu_prefetch import distance_for

        cores = int(target.attrs.get("num-cores", 1) or 1)
        return cls(num_cores=max(cores, 1), vector_bits=_vector_bits(target), int8_dot=dot_intrin_for(target), prefetch_bytes=distance_for(target))

    def lanes(self, dtype_bits: int) -> int:
        return max(self.vector_bits // dtype_bits, 1)

    @property
    def acc_regs(self) -> int:
        return _ACC_REGS_32 if self.vector_bits >= 512 else _ACC_REGS_16


def _vector_bits(target) -> int:
    """SIMD width from the CPU's features (``llvm_get_vector_width`` says 512 on znver3)."""
    for feature, bits in (("avx512f", 512), ("avx", 256)):
        if target_has(target, feature):
            return bits
    return 128  # SSE, NEON


def default_cpu_schedule(target):
    """The pass that gives every unscheduled PrimFunc a default CPU schedule.

    Parameters
    ----------
    target : tvm.target.Target
        The LLVM target; ``num-cores`` and the vector width are read from it.

    Returns
    -------
    tvm.transform.Pass
        A module pass; functions it scheduled are marked ``tirx.is_scheduled``.
    """
    return DefaultCpuSchedule(CpuFacts.from_target(target), target)


def _is_scheduled(func) -> bool:
    return any(bool(func.attrs.get(key, False)) for key in _SCHEDULED_ATTRS) if func.attrs else False


def _module_pass():
    import tvm

    return tvm.transform.module_pass(opt_level=0, name="HwcDefaultCpuSchedule")


@_module_pass()
class DefaultCpuSchedule:
    """Module pass: schedule each unscheduled PrimFunc with the first rule that works."""

    def __init__(self, facts: CpuFacts, target):
        self.facts = facts
        self.target = target

    def transform_module(self, mod, _ctx):
        import tvm

        updates = {}
        for gvar, func in mod.functions_items():
            if not isinstance(func, tvm.tirx.PrimFunc) or _is_scheduled(func):
                continue
            scheduled = schedule_prim_func(func, self.facts, self.target, name=gvar.name_hint)
            if scheduled is not None:
                updates[gvar] = scheduled.with_attr("tirx.is_scheduled", True)
        if not updates:
            return mod
        mod = mod.clone()  # the caller's module must not change under it
        for gvar, func in updates.items():
            mod[gvar] = func
        return mod


def schedule_prim_func(func, facts: CpuFacts, target, name: str = "main"):
    """The scheduled ``func`` from the first rule that applies and lowers, else None."""
    sch = default_schedule_of(func, facts, target, name=name)
    return None if sch is None else sch.mod["main"]


def default_schedule_of(func, facts: CpuFacts, target, name: str = "main"):
    """The traced ``s_tir.Schedule`` of the first rule that applies and lowers, else None.

    ``func`` is a PrimFunc or an ``IRModule`` whose ``main`` it is (a tuning task's module).
    The schedule's trace replays the rule on that module, which is how tuning seeds its
    database with the default schedule.
    """
    from tvm import s_tir

    for rule_name, rule in _RULES:
        sch = s_tir.Schedule(func)
        try:
            if rule(sch, facts) is False:
                continue
            _check_lowers(sch.mod["main"], target)
        except Exception as e:  # a rule that does not fit raises ScheduleError or TVMError
            log.debug("%s: rule %s does not apply: %s", name, rule_name, str(e).strip().splitlines()[-1:])
            continue
        log.debug("%s: scheduled by %s", name, rule_name)
        return sch
    log.debug("%s: left unscheduled", name)
    return None


def default_trace(target):
    """``func -> Schedule | None``: the default schedule of one kernel for ``target`` (see
    ``default_schedule_of``); the backend's hook for seeding tuning databases."""
    facts = CpuFacts.from_target(target)

    def schedule_of(func):
        return default_schedule_of(func, facts, target)

    return schedule_of


def _check_lowers(func, target) -> None:
    """Run the TIR lowering passes that a bad schedule trips (vectorize, unroll, storage) so
    that it is rejected here rather than failing the build."""
    import tvm
    from tvm import s_tir, tirx

    passes = [
        s_tir.transform.CanonicalizeLoop(),
        s_tir.transform.LowerInitBlock(),
        s_tir.transform.PlanAndUpdateBufferAllocationLocation(),
        s_tir.transform.ConvertBlocksToOpaque(),
        s_tir.transform.CompactBufferAllocation(),
        s_tir.transform.LowerMatchBuffer(),
        s_tir.transform.StmtSimplify(),
        s_tir.transform.LowerOpaqueBlock(),
        tirx.transform.FlattenBuffer(),
        tirx.transform.NarrowDataType(32),
        s_tir.transform.LoopPartition(),
        tirx.transform.VectorizeLoop(True),
        tirx.transform.StorageRewrite(),
        tirx.transform.UnrollLoop(),
        tirx.transform.StmtSimplify(),
    ]
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main").with_attr("target", target)})
    with target:
        tvm.transform.Sequential(passes)(mod)


_RULES = (
    ("packed_conv", schedule_packed_conv),
    ("int8", schedule_int8),
    ("int8_winograd", schedule_int8_winograd),
    ("winograd", schedule_winograd),
    ("tiled_reduction", tiled_reduction),
    ("per_block", per_block),
    ("per_block_no_inline", lambda sch, facts: per_block(sch, facts, inline=False)),
)
