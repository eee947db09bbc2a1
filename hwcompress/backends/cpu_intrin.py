"""CPU integer dot-product tensor intrinsics for the INT8 kernels (``cpu_int8``).

One intrinsic computes ``C[i] += sum_k A[k] * B[i, k]`` for one vector of ``lanes`` int32
outputs ``C`` (the accumulator tile, ``local`` scope), ``group`` consecutive reduction
elements ``A`` (one input pixel or row, broadcast) and a packed weight panel ``B`` (``lanes``
output channels x ``group``, int8; int16 for ``PMADDWD16``). Five instructions for the int8
kernels, picked from the target's features (``dot_intrin_for``) and the layer's weights
(``dot_for_weights``), and one for the integer Winograd's GEMM (``cpu_int8_winograd``):

* ``VNNI`` (AVX512-VNNI): ``vpdpbusd`` multiplies 4 u8 x s8 pairs per int32 lane and adds
  them to the accumulator in one instruction; exact (the sums of four products fit in
  int32). ``A`` is the uint8 activation itself. TVM's own ``dot_16x4_vnni`` fails LLVM 22's
  verification (``llvm.x86.avx512.vpdpbusd.512`` now takes ``<64 x i8>`` operands, it passes
  ``<16 x i32>``); this one passes the bytes.
* ``PMADDWD`` (SSE2 / AVX2 / AVX512-BW): ``vpmaddwd`` multiplies int16 pairs and sums each pair
  into int32, exact for u8 x s8. ``A`` is the activation widened to int16 (a pair broadcast
  as one int32: ``vpbroadcastd``), ``B`` stays int8 in memory and is sign-extended
  (``vpmovsxbw``) once per weight vector, shared by all pixels of the tile. Widening the
  activation inside the kernel (``vpbroadcastw`` + ``vpmovzxbw`` per pixel) measured 2x
  slower than reading a pre-widened int16 copy.
* ``PMADDUBSW`` (AVX2 / AVX512-BW, oneDNN's and ONNX Runtime's u8 x s8 path without VNNI):
  ``vpmaddubsw`` multiplies u8 x s8 byte pairs into int16 pair sums, ``vpmaddwd`` by int16
  ones adds two pairs into int32, ``vpaddd`` accumulates: the groups of 4 and the layout of
  VNNI, uint8 activations read in place. The int16 sums saturate unless the weights are
  7-bit: with ``|w| <= SATURATION_FREE_WEIGHT`` (64) a pair is at most 255 * 64 * 2 = 32640.
  ``dot_for_weights`` picks it only for such weights (the quantizer makes them, ``qmax=63``,
  on ``[hardware].int8 = "avx2"``); any other weight keeps the exact ``PMADDWD``. On Zen 3
  both steps issue on the two vector-multiply pipes, 32 MACs a cycle: 95 GMAC/s per core on
  3x3 convs, against 75 for ``PMADDWD`` (whose widening and extra broadcasts cost the rest).
* ``SDOT`` (aarch64 with the dot-product extension, ``+dotprod``: Cortex-A55/A76 and newer):
  ``sdot`` multiplies 4 s8 x s8 pairs per int32 lane of a 128-bit NEON vector and adds them
  to the accumulator in place; exact. It is signed x signed and the activations are uint8,
  so ``A`` is the activation shifted by ``data_shift`` = 128 (``x - 128``, i.e. ``x ^ 0x80``
  read as int8; the kernel's ``data_pad`` copy makes it, the padding value shifted too) and
  the kernel adds back ``128 * sum_k B[i, k]`` per output channel (``cpu_int8.shift_correction``,
  a constant computed when the weights are packed), so that it still computes
  ``sum_k x[k] * B[i, k]`` exactly. ``udot`` (u8 x u8) would need unsigned weights instead.
* ``SMULL`` (aarch64 NEON without dotprod: Cortex-A53/A72): ``smull`` multiplies 8 s8 x s8
  pairs into int16 products, ``sadalp`` adds each adjacent pair into an int32 accumulator:
  groups of 2, the same shifted int8 data and correction as ``SDOT``. Exact: a product of
  ``x - 128`` and a weight lies in ``[-16256, 16384]``, inside int16.
* ``PMADDWD16`` (AVX2): ``vpmaddwd`` as ``PMADDWD``, on int16 weights read as they are (the
  integer Winograd's transformed weights and data both exceed int8).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Int8Dot(enum.Enum):
    """The instruction of the innermost integer dot product."""

    PMADDWD = "pmaddwd"
    PMADDUBSW = "pmaddubsw"  # exact for |weight| <= SATURATION_FREE_WEIGHT only
    VNNI = "vnni"
    SDOT = "sdot"  # aarch64 +dotprod; signed data: the activations are shifted by 128
    SMULL = "smull"  # aarch64 NEON without dotprod; shifted like SDOT
    PMADDWD16 = "pmaddwd16"  # int16 x int16: the integer Winograd's batched GEMM


# |w| <= 64: a vpmaddubsw pair sum is at most 255 * 64 * 2 = 32640, inside int16
SATURATION_FREE_WEIGHT = 64


# LLVM intrinsic of each (instruction, vector bits); PMADDUBSW's second step is PMADDWD's
_LLVM = {
    (Int8Dot.PMADDWD, 128): "llvm.x86.sse2.pmadd.wd",
    (Int8Dot.PMADDWD, 256): "llvm.x86.avx2.pmadd.wd",
    (Int8Dot.PMADDWD, 512): "llvm.x86.avx512.pmaddw.d.512",
    (Int8Dot.PMADDUBSW, 256): "llvm.x86.avx2.pmadd.ub.sw",
    (Int8Dot.PMADDUBSW, 512): "llvm.x86.avx512.pmaddubs.w.512",
    (Int8Dot.VNNI, 512): "llvm.x86.avx512.vpdpbusd.512",
    (Int8Dot.SDOT, 128): "llvm.aarch64.neon.sdot.v4i32.v16i8",
    (Int8Dot.SMULL, 128): "llvm.aarch64.neon.smull.v8i16",  # then saddlp (sadalp with the add)
    (Int8Dot.PMADDWD16, 256): "llvm.x86.avx2.pmadd.wd",
}
_SIGNED_DATA = (Int8Dot.SDOT, Int8Dot.SMULL)

# what SDOT's and SMULL's data operand is: the uint8 activation minus this, as int8
_SIGNED_DATA_SHIFT = 128


@dataclass(frozen=True)
class DotIntrin:
    """One registered dot-product intrinsic: ``kind`` on vectors of ``lanes`` int32."""

    kind: Int8Dot
    lanes: int

    def __post_init__(self):
        if (self.kind, self.lanes * 32) not in _LLVM:
            raise ValueError(f"no {self.kind.value} intrinsic for {self.lanes} int32 lanes")

    @property
    def group(self) -> int:
        """Consecutive reduction elements per int32 lane (the packed weight's last axis)."""
        return 2 if self.kind in (Int8Dot.PMADDWD, Int8Dot.PMADDWD16, Int8Dot.SMULL) else 4

    @property
    def data_dtype(self) -> str:
        """Element type of the activation operand ``A``."""
        if self.kind in (Int8Dot.PMADDWD, Int8Dot.PMADDWD16):
            return "int16"
        return "int8" if self.kind in _SIGNED_DATA else "uint8"

    @property
    def weight_dtype(self) -> str:
        """Element type of the weight operand ``B``."""
        return "int16" if self.kind is Int8Dot.PMADDWD16 else "int8"

    @property
    def data_shift(self) -> int:
        """What is subtracted from the uint8 activation to make ``A`` (0: nothing). Where it
        is not 0 the kernel adds ``data_shift * sum_k B[i, k]`` to each output channel."""
        return _SIGNED_DATA_SHIFT if self.kind in _SIGNED_DATA else 0

    @property
    def name(self) -> str:
        return f"hwc_dot_{self.lanes}x{self.group}_{self.kind.value}"

    @property
    def acc_regs(self) -> int:
        """Accumulator vectors a register tile may hold. ``vpmaddwd`` writes a temporary that
        is then added, so AVX2's 16 registers hold accumulators + ``nvec`` weight vectors + a
        broadcast + the temporary: 1x3x4 tiles spilled (49 against 75 GMAC/s), 1x7x2 too (59);
        with 10, no tile ``choose_tile`` may pick spills. ``vpmaddubsw`` needs one more (the
        int16 ones) and still fits 1x5x2 / 1x3x3 / 1x2x4 without spills; 8 or 12 measured no
        faster. ``vpdpbusd`` accumulates in place. So does ``sdot``, among NEON's 32 registers:
        24 accumulators leave room for up to 4 weight vectors and the broadcasts, the budget
        of Arm's own 8x12 ``sdot`` GEMM kernels (no spills in the assembly; not timed on a
        device). ``smull`` writes a temporary, as ``vpmaddwd`` does: 20 (no spills either)."""
        if self.lanes * 32 >= 512 or self.kind is Int8Dot.SDOT:
            return 24
        return 20 if self.kind is Int8Dot.SMULL else 10


def target_has(target, feature: str) -> bool:
    """Whether the LLVM ``target`` has CPU ``feature`` (LLVM's spelling: ``avx2``,
    ``avx512vnni``, ``dotprod``); False for a feature its backend does not know (an x86 name on
    aarch64)."""
    from tvm.target.codegen import target_has_features

    try:
        return bool(target_has_features(feature, target))
    except Exception:  # a feature this target's LLVM backend does not know
        return False


def dot_intrin_for(target) -> DotIntrin | None:
    """The best exact integer dot intrinsic of an LLVM ``target``: x86 from SSE2 up, aarch64
    (``sdot`` with ``+dotprod``, else NEON's ``smull``); None for any other CPU."""
    if bool(target.attrs.get("feature.is_aarch64", False)):
        return DotIntrin(Int8Dot.SDOT, 4) if target_has(target, "dotprod") else DotIntrin(Int8Dot.SMULL, 4) if target_has(target, "neon") else None
    if target_has(target, "avx512vnni") and target_has(target, "avx512bw"):
        return DotIntrin(Int8Dot.VNNI, 16)
    if target_has(target, "avx512bw"):
        return DotIntrin(Int8Dot.PMADDWD, 16)
    if target_has(target, "avx2"):
        return DotIntrin(Int8Dot.PMADDWD, 8)
    if target_has(target, "sse2"):
        return DotIntrin(Int8Dot.PMADDWD, 4)
    return None


def dot_for_weights(intrin: DotIntrin | None, max_abs_weight: int) -> DotIntrin | None:
    """The dot intrinsic for constant weights of largest magnitude ``max_abs_weight``:
    ``PMADDUBSW`` of ``intrin``'s width where ``intrin`` is ``PMADDWD`` (no VNNI) and the
    weights are small enough for it to be exact, else ``intrin`` itself."""
    if intrin is None or intrin.kind is not Int8Dot.PMADDWD or max_abs_weight > SATURATION_FREE_WEIGHT:
        return intrin
    if (Int8Dot.PMADDUBSW, intrin.lanes * 32) not in _LLVM:  # SSE2: pmaddubsw is SSSE3
        return intrin
    return DotIntrin(Int8Dot.PMADDUBSW, intrin.lanes)


def intrin_named(name: str) -> DotIntrin:
    """The ``DotIntrin`` whose ``name`` is ``name`` (registering it with TVM if needed)."""
    for kind, bits in _LLVM:
        intrin = DotIntrin(kind, bits // 32)
        if intrin.name == name:
            register(intrin)
            return intrin
    raise ValueError(f"unknown int8 dot intrinsic {name!r}")


def register(intrin: DotIntrin) -> str:
    """Register ``intrin`` as a TVM tensor intrinsic (once per process); returns its name."""
    from tvm.s_tir import TensorIntrin

    if TensorIntrin.get(intrin.name, allow_missing=True) is None:
        TensorIntrin.register(intrin.name, *_desc_impl(intrin))
    return intrin.name


def _desc_impl(intrin: DotIntrin):
    """TVMScript description and implementation of ``intrin``."""
    from tvm.script import tirx as T

    lanes, group, a_dtype, w_dtype = intrin.lanes, intrin.group, intrin.data_dtype, intrin.weight_dtype
    llvm_name = _LLVM[(intrin.kind, lanes * 32)]
    acc_t = f"int32x{lanes}"

    @T.prim_func(s_tir=True)
    def desc(
        A: T.Buffer((group,), a_dtype, offset_factor=1),
        B: T.Buffer((lanes, group), w_dtype, offset_factor=1),
        C: T.Buffer((lanes,), "int32", offset_factor=1, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:group], B[0:lanes, 0:group])
            T.writes(C[0:lanes])
            for i, k in T.grid(lanes, group):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.Cast("int32", A[vk]) * T.Cast("int32", B[vi, vk])

    if intrin.kind is Int8Dot.VNNI:
        bytes_t = f"int8x{lanes * 4}"
        ubytes_t = f"uint8x{lanes * 4}"

        @T.prim_func(s_tir=True)
        def impl(
            A: T.Buffer((group,), a_dtype, offset_factor=1),
            B: T.Buffer((lanes, group), w_dtype, offset_factor=1),
            C: T.Buffer((lanes,), "int32", offset_factor=1, scope="local"),
        ) -> None:
            with T.sblock("root"):
                T.reads(C[0:lanes], A[0:group], B[0:lanes, 0:group])
                T.writes(C[0:lanes])
                a = T.reinterpret(T.Broadcast(T.reinterpret(A.vload([0], "uint8x4"), dtype="int32"), lanes), dtype=ubytes_t)
                C[T.Ramp(T.int32(0), 1, lanes)] = T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id(llvm_name), C.vload([0], acc_t), a, B.vload([0, 0], bytes_t), dtype=acc_t
                )

    elif intrin.kind is Int8Dot.SDOT:
        bytes_t = f"int8x{lanes * 4}"

        @T.prim_func(s_tir=True)
        def impl(
            A: T.Buffer((group,), a_dtype, offset_factor=1),
            B: T.Buffer((lanes, group), w_dtype, offset_factor=1),
            C: T.Buffer((lanes,), "int32", offset_factor=1, scope="local"),
        ) -> None:
            with T.sblock("root"):
                T.reads(C[0:lanes], A[0:group], B[0:lanes, 0:group])
                T.writes(C[0:lanes])
                a = T.reinterpret(T.Broadcast(T.reinterpret(A.vload([0], "int8x4"), dtype="int32"), lanes), dtype=bytes_t)
                C[T.Ramp(T.int32(0), 1, lanes)] = T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id(llvm_name), C.vload([0], acc_t), B.vload([0, 0], bytes_t), a, dtype=acc_t
                )

    elif intrin.kind is Int8Dot.SMULL:
        pair_t, bytes_t = f"int16x{lanes * 2}", f"int8x{lanes * 2}"
        saddlp = f"llvm.aarch64.neon.saddlp.v{lanes}i32.v{lanes * 2}i16"

        @T.prim_func(s_tir=True)
        def impl(
            A: T.Buffer((group,), a_dtype, offset_factor=1),
            B: T.Buffer((lanes, group), w_dtype, offset_factor=1),
            C: T.Buffer((lanes,), "int32", offset_factor=1, scope="local"),
        ) -> None:
            with T.sblock("root"):
                T.reads(C[0:lanes], A[0:group], B[0:lanes, 0:group])
                T.writes(C[0:lanes])
                a = T.reinterpret(T.Broadcast(T.reinterpret(A.vload([0], "int8x2"), dtype="int16"), lanes), dtype=bytes_t)
                b = B.vload([0, 0], bytes_t)
                products = T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(llvm_name), a, b, dtype=pair_t)
                C[T.Ramp(T.int32(0), 1, lanes)] = C.vload([0], acc_t) + T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id(saddlp), products, dtype=acc_t
                )

    elif intrin.kind is Int8Dot.PMADDUBSW:
        bytes_t = f"int8x{lanes * 4}"
        ubytes_t = f"uint8x{lanes * 4}"
        pair_t = f"int16x{lanes * 2}"
        pmaddwd = _LLVM[(Int8Dot.PMADDWD, lanes * 32)]

        @T.prim_func(s_tir=True)
        def impl(
            A: T.Buffer((group,), a_dtype, offset_factor=1),
            B: T.Buffer((lanes, group), w_dtype, offset_factor=1),
            C: T.Buffer((lanes,), "int32", offset_factor=1, scope="local"),
        ) -> None:
            with T.sblock("root"):
                T.reads(C[0:lanes], A[0:group], B[0:lanes, 0:group])
                T.writes(C[0:lanes])
                a = T.reinterpret(T.Broadcast(T.reinterpret(A.vload([0], "uint8x4"), dtype="int32"), lanes), dtype=ubytes_t)
                pairs = T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(llvm_name), a, B.vload([0, 0], bytes_t), dtype=pair_t)
                C[T.Ramp(T.int32(0), 1, lanes)] = C.vload([0], acc_t) + T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id(pmaddwd), pairs, T.Broadcast(T.int16(1), lanes * 2), dtype=acc_t
                )

    else:  # PMADDWD: int8 weights sign-extended per vector; PMADDWD16: int16 weights as they are
        pair_t = f"int16x{lanes * 2}"
        wbytes_t = f"{w_dtype}x{lanes * 2}"

        @T.prim_func(s_tir=True)
        def impl(
            A: T.Buffer((group,), a_dtype, offset_factor=1),
            B: T.Buffer((lanes, group), w_dtype, offset_factor=1),
            C: T.Buffer((lanes,), "int32", offset_factor=1, scope="local"),
        ) -> None:
            with T.sblock("root"):
                T.reads(C[0:lanes], A[0:group], B[0:lanes, 0:group])
                T.writes(C[0:lanes])
                a = T.reinterpret(T.Broadcast(T.reinterpret(A.vload([0], "int16x2"), dtype="int32"), lanes), dtype=pair_t)
                b = B.vload([0, 0], wbytes_t) if w_dtype == "int16" else T.Cast(pair_t, B.vload([0, 0], wbytes_t))
                C[T.Ramp(T.int32(0), 1, lanes)] = C.vload([0], acc_t) + T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id(llvm_name), a, b, dtype=acc_t
                )

    return desc, impl
