"""The CPU INT8 kernels on aarch64: ``sdot`` with the dot-product extension (arm-cortex-a76),
``smull`` + ``sadalp`` on plain NEON (arm-cortex-a72).

Both are signed x signed: the kernels feed ``x - 128`` and add ``128 * sum_k w`` per output
channel (``shift_correction``). Structural: the choice of intrinsic per target, the kernels
legalized and tensorized with it (uint8 / int8 params, the int32 correction, the instruction
in the assembly); numerical: the correction in numpy, then convs (zero-point padding, stride
2, 1x1, channel counts that are no multiples of 16) and dense layers bit-exact against numpy
int64 references, cross-compiled and run under qemu-aarch64 by the deploy runner; last an
``hwcompress.compile`` int8 build of a small CNN for the A76, verified under qemu by the build
itself and against ONNX Runtime's float output (SQNR).
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from tvm import relax  # noqa: E402

from hwcompress import build as B  # noqa: E402
from hwcompress.backends.cpu_int8 import DOT_ATTR, TILE_ATTR, pack_conv_weight, pack_dense_weight, shift_correction  # noqa: E402
from hwcompress.backends.cpu_intrin import DotIntrin, Int8Dot, dot_intrin_for  # noqa: E402
from hwcompress.targets import load_target  # noqa: E402

from test_arm_runner import _spec_or_skip  # noqa: E402

SDOT, SMULL = DotIntrin(Int8Dot.SDOT, 4), DotIntrin(Int8Dot.SMULL, 4)
A76, A72 = load_target("arm-cortex-a76"), load_target("arm-cortex-a72")
# target -> (its intrinsic, the LLVM intrinsic in the kernel, the instructions in the assembly)
ARM_DOTS = {
    "arm-cortex-a76": (SDOT, "llvm.aarch64.neon.sdot", ("sdot\tv",)),
    "arm-cortex-a72": (SMULL, "llvm.aarch64.neon.smull", ("smull\tv", "sadalp\tv")),
}

# (name, input, (O, K), strides, padding (t, l, b, r), zero point of the padding)
CONVS = [
    ("conv_3x3_3_to_24", (1, 12, 12, 3), (24, 3), (1, 1), (1, 1, 1, 1), 0),  # the conv pads with 0 itself
    ("conv_3x3_s2_24_to_40_zp", (1, 11, 11, 24), (40, 3), (2, 2), (1, 1, 2, 0), 131),  # explicit nn.pad
    ("conv_1x1_24_to_40", (1, 11, 11, 24), (40, 1), (1, 1), (0, 0, 0, 0), 0),
]
DENSES = [("dense_3x70_by_70x20", (3, 70), 20), ("gemv_1x50_by_50x10", (1, 50), 10)]


# ---------------------------------------------------------------------------- references


def conv_ref(x, w_ohwi, strides, padding, pad_value):
    """NHWC x OHWI conv in int64, the input padded with ``pad_value``."""
    (sh, sw), (pt, pl, pb, pr) = strides, padding
    xp = np.pad(x.astype(np.int64), ((0, 0), (pt, pb), (pl, pr), (0, 0)), constant_values=pad_value)
    o, kh, kw, _ = w_ohwi.shape
    out_h, out_w = (xp.shape[1] - kh) // sh + 1, (xp.shape[2] - kw) // sw + 1
    out = np.zeros((x.shape[0], out_h, out_w, o), np.int64)
    for ky in range(kh):
        for kx in range(kw):
            patch = xp[:, ky : ky + (out_h - 1) * sh + 1 : sh, kx : kx + (out_w - 1) * sw + 1 : sw]
            out += np.einsum("nhwc,oc->nhwo", patch, w_ohwi[:, ky, kx].astype(np.int64))
    return out


def _weights(rng, shape):
    """Full-range int8 weights with both extremes, -128 and 127, in every output channel."""
    w = rng.integers(-128, 128, shape, dtype=np.int8)
    flat = w.reshape(shape[0], -1) if len(shape) == 4 else w.T  # (O, ...) / (N, K) views
    flat[:, 0], flat[:, -1] = -128, 127
    return w


# ---------------------------------------------------------------------------- pure parts


def test_sdot_with_dotprod_smull_without():
    assert dot_intrin_for(A76.tvm_target()) == SDOT
    assert dot_intrin_for(A72.tvm_target()) == SMULL
    assert (SDOT.group, SDOT.data_dtype, SDOT.data_shift, SDOT.name) == (4, "int8", 128, "hwc_dot_4x4_sdot")
    assert (SMULL.group, SMULL.data_dtype, SMULL.data_shift, SMULL.name) == (2, "int8", 128, "hwc_dot_4x2_smull")
    assert 128 * 128 <= 32767 and -128 * 127 >= -32768  # an smull product of x - 128 and w fits int16
    assert dot_intrin_for(load_target("x86-avx512").tvm_target()).data_shift == 0  # x86 reads uint8 as it is
    for kind in (Int8Dot.SDOT, Int8Dot.SMULL):
        with pytest.raises(ValueError):
            DotIntrin(kind, 8)  # 128-bit NEON only


@pytest.mark.parametrize("kind", ["conv", "dense"])
def test_shift_correction_restores_the_uint8_sums(kind):
    """``sum (x - 128) w + shift_correction = sum x w`` per output channel, padded channels
    (zero weights) included; the shifted data fits int8 for every uint8."""
    rng = np.random.default_rng(0)
    x = np.arange(256, dtype=np.uint8)
    assert ((x.astype(np.int32) - 128).astype(np.int8) == (x ^ 0x80).view(np.int8)).all()
    if kind == "conv":
        w = _weights(rng, (10, 3, 3, 5))
        packed = pack_conv_weight(w, 8, 4)  # (2, 3, 3, 2, 8, 4): O and I padded
        xs = rng.integers(0, 256, (3, 3, 8), dtype=np.uint8)  # one window, I padded to 8
        xs[..., 5:] = 0
        lhs = np.einsum("abcdeg,bcdg->ae", packed.astype(np.int64), xs.reshape(3, 3, 2, 4).astype(np.int64) - 128)
        want = np.einsum("ohwi,hwi->o", w.astype(np.int64), xs[..., :5].astype(np.int64))
    else:
        w = _weights(rng, (70, 20))
        packed = pack_dense_weight(w, 8, 4)  # (3, 18, 8, 4)
        xs = np.zeros(72, np.uint8)
        xs[:70] = rng.integers(0, 256, 70)
        lhs = np.einsum("akeg,kg->ae", packed.astype(np.int64), xs.reshape(18, 4).astype(np.int64) - 128)
        want = xs[:70].astype(np.int64) @ w.astype(np.int64)
    corr = shift_correction(packed, 128)
    assert corr.dtype == np.int32 and corr.shape == (packed.shape[0] * packed.shape[-2],)
    got = lhs.reshape(-1) + corr
    np.testing.assert_array_equal(got[: len(want)], want)
    assert not got[len(want) :].any()  # padded output channels: zero weights, zero correction


# ---------------------------------------------------------------------------- the kernels


def _kernel_module(seed: int = 0):
    """One Relax function computing every case of ``CONVS`` / ``DENSES`` (uint8 inputs,
    constant int8 weights, int32 outputs, a tuple); the inputs' shapes and the weights."""
    rng = np.random.default_rng(seed)
    bb = relax.BlockBuilder()
    params, weights, outs = {}, {}, []
    for name, shape, *_ in CONVS + DENSES:
        if shape not in params:
            params[shape] = relax.Var(f"x{len(params)}", relax.TensorType(shape, "uint8"))
    with bb.function("main", list(params.values())):
        with bb.dataflow():
            for name, shape, (o, k), strides, padding, zp in CONVS:
                weights[name] = w = _weights(rng, (o, k, k, shape[-1]))
                x, conv_pad = params[shape], padding
                if zp:  # relax.nn.conv2d pads with 0: the zero point is an explicit pad, as int8_graph emits it
                    pt, pl, pb, pr = padding
                    x = bb.emit(relax.op.nn.pad(x, [0, 0, pt, pb, pl, pr, 0, 0], pad_value=float(zp)))
                    conv_pad = (0, 0, 0, 0)
                conv = relax.op.nn.conv2d(x, relax.const(w), strides=strides, padding=conv_pad, data_layout="NHWC",
                                          kernel_layout="OHWI", out_dtype="int32")  # fmt: skip
                outs.append(bb.emit(conv))
            for name, shape, n in DENSES:
                weights[name] = w = _weights(rng, (shape[1], n))
                outs.append(bb.emit(relax.op.matmul(params[shape], relax.const(w), out_dtype="int32")))
            out = bb.emit_output(relax.Tuple(outs))
        bb.emit_func_output(out)
    return bb.get(), list(params), weights


def _references(shapes, weights, inputs):
    by_shape = dict(zip(shapes, inputs))
    refs = [conv_ref(by_shape[shape], weights[name], strides, padding, zp) for name, shape, _, strides, padding, zp in CONVS]
    refs += [by_shape[shape].astype(np.int64) @ weights[name].astype(np.int64) for name, shape, _ in DENSES]
    return refs


def _kernels(mod):
    return {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}


@pytest.fixture(scope="module", params=sorted(ARM_DOTS))
def arm_kernels(request):
    """The kernel module legalized, scheduled and built for an ARM target (no emulator needed)."""
    spec = load_target(request.param)
    mod, shapes, weights = _kernel_module()
    scheduled = B.schedule(B.legalize(mod, spec), spec)
    return spec, scheduled, B.build(scheduled, spec), shapes, weights


def test_arm_kernels_are_tensorized(arm_kernels):
    """Every conv and dense is the backend's packed kernel, its dot the target's intrinsic;
    the kernel takes the uint8 data, the packed int8 weight (groups of ``g``) and the int32
    correction; the assembly multiplies with ``sdot`` (A76) / ``smull`` + ``sadalp`` (A72)."""
    spec, scheduled, ex, _, _ = arm_kernels
    intrin, llvm_name, instructions = ARM_DOTS[spec.name]
    g = intrin.group
    tiled = {name: f for name, f in _kernels(scheduled).items() if TILE_ATTR in f.script()}
    assert len(tiled) == len(CONVS) + len(DENSES)
    for name, func in tiled.items():
        script = func.script()
        assert f'"{DOT_ATTR}": "{intrin.name}"' in script and llvm_name in script, name
        assert func.attrs.get("tirx.is_scheduled"), name
        data, weight, corr = (func.params[i].ty for i in range(3))
        assert (str(data.dtype), str(weight.dtype), str(corr.dtype)) == ("uint8", "int8", "int32"), name
        assert int(weight.shape[-1]) == g and int(weight.shape[-2]) % 4 == 0, name  # (..., ob, g)
        assert int(corr.shape[0]) == int(weight.shape[0]) * int(weight.shape[-2]), name  # one per packed channel
    convs = [f for f in tiled.values() if len(f.params[1].ty.shape) == 6]
    conv_shapes = sorted(tuple(int(d) for d in f.params[1].ty.shape[1:4]) for f in convs)
    assert conv_shapes == [(1, 1, 24 // g), (3, 3, -(-3 // g)), (3, 3, 24 // g)]  # (KH, KW, I/g): I = 3 padded
    asm = ex.mod.imports[0].inspect_source("asm")
    assert all(i in asm for i in instructions) and ".4s" in asm


@pytest.fixture(scope="module")
def arm_kernel_artifact(arm_kernels, tmp_path_factory):
    from hwcompress.backends import get_backend
    from hwcompress.backends.runner import runner_files

    spec, _, ex, shapes, weights = arm_kernels
    _spec_or_skip(spec.name)
    workdir = tmp_path_factory.mktemp(f"{spec.name}-int8-kernels")
    get_backend(spec).export(ex, workdir / "module.so", spec)
    for f in runner_files(spec.arch):
        shutil.copy2(f, workdir / f.name)
    return spec, workdir, shapes, weights


@pytest.mark.qemu
@pytest.mark.parametrize("data", ["random", "extremes"])
def test_arm_kernels_are_bit_exact_under_qemu(arm_kernel_artifact, data):
    """Full-range uint8 data (``extremes``: only 0 and 255, the largest sums against the -128
    and 127 weights) x full-range int8 weights, zero points 0 and 131: every output equals
    the int64 numpy result."""
    from hwcompress.backends.runner import run_with_runner

    spec, workdir, shapes, weights = arm_kernel_artifact
    rng = np.random.default_rng(7)
    if data == "random":
        inputs = [rng.integers(0, 256, s, dtype=np.uint8) for s in shapes]
    else:
        inputs = [np.where(rng.random(s) < 0.7, 255, 0).astype(np.uint8) for s in shapes]
    outs, _ = run_with_runner(workdir, "module.so", inputs, spec.runtime.emulator, spec.runtime.sysroot)
    refs = _references(shapes, weights, inputs)
    assert len(outs) == len(refs)
    for (name, *_), got, want in zip(CONVS + DENSES, outs, refs):
        assert got.dtype == np.int32 and got.shape == want.shape, name
        np.testing.assert_array_equal(got, want, err_msg=name)


# ---------------------------------------------------------------------------- an int8 network


def _cnn():
    """Conv 3->24 (3x3) + Relu, Conv 24->40 (3x3, stride 2), Conv 40->40 (1x1) + Relu, global
    average pool, Gemm 40->10. The first and last convs read signed tensors (zero point > 0:
    an explicit zero-point pad before the first), the second a ReLU output (zero point 0)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def init(name, *shape, scale=0.3):
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Conv", ["c2", "w3"], ["c3"]),
        helper.make_node("Relu", ["c3"], ["r3"]),
        helper.make_node("GlobalAveragePool", ["r3"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], transB=1),
    ]
    inits = [init("w1", 24, 3, 3, 3), init("b1", 24, scale=0.1), init("w2", 40, 24, 3, 3, scale=0.1),
             init("b2", 40, scale=0.1), init("w3", 40, 40, 1, 1, scale=0.2), init("wf", 10, 40), init("bf", 10)]  # fmt: skip
    graph = helper.make_graph(
        nodes,
        "int8_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # onnxruntime refuses IR > 10
    onnx.checker.check_model(model)
    return model


def _integer_reductions(mod) -> list[tuple[str, list[str], list[str]]]:
    """Every reduction block of ``mod``'s kernels that multiplies two tensors (conv, matmul):
    ``(kernel, operand dtypes, accumulator dtypes)``."""
    import tvm_ffi
    from tvm.s_tir import SBlock

    found = []
    for name, func in _kernels(mod).items():
        blocks = []
        tvm_ffi.structural_walk(func.body, (SBlock, blocks.append), order="post")
        for block in blocks:
            if not any(iv.iter_type == tvm.tirx.IterVar.CommReduce for iv in block.iter_vars):
                continue
            written = {w.source.name for w in block.writes}
            operands = [str(r.source.dtype) for r in block.reads if r.source.name not in written]
            if len(operands) >= 2:
                found.append((name, operands, [str(w.source.dtype) for w in block.writes]))
    return found


def test_a76_int8_cnn_convs_are_sdot_kernels():
    """The quantized network legalized and scheduled for the A76: its 3 convs and the Gemm are
    integer kernels (int8 x int8 operands: the shifted data and the weights, int32 sums)
    tensorized with ``sdot``; the float import has float reductions only."""
    from hwcompress.api import import_model
    from hwcompress.passes import Int8Static
    from hwcompress.recipe import Recipe

    calib = np.random.default_rng(1).standard_normal((8, 3, 16, 16)).astype(np.float32)
    front = import_model(_cnn(), A76, recipe=Recipe((Int8Static(data=calib),)))
    scheduled = B.schedule(B.legalize(front.mod, A76), A76)
    macs = _integer_reductions(scheduled)
    assert len(macs) == 4
    assert all(ops == ["int8", "int8"] and acc == ["int32"] for _, ops, acc in macs), macs
    assert all(SDOT.name in _kernels(scheduled)[name].script() for name, _, _ in macs)
    fp32 = _integer_reductions(B.schedule(B.legalize(import_model(_cnn(), A76).mod, A76), A76))
    assert len(fp32) == 4 and all(set(ops) == {"float32"} for _, ops, _ in fp32)


@pytest.mark.qemu
def test_a76_int8_cnn_build_verifies_under_qemu(tmp_path):
    """``hwcompress.compile`` with an int8 recipe for the A76: the build's own verification
    runs the artifact under qemu against the int8 graph run on this host; the artifact's
    output is also close to ONNX Runtime's float output (SQNR in dB)."""
    ort = pytest.importorskip("onnxruntime")
    import hwcompress
    from hwcompress.passes import Int8Static
    from hwcompress.passes.quantize import sqnr_db
    from hwcompress.recipe import Recipe

    _spec_or_skip("arm-cortex-a76")
    model = _cnn()
    rng = np.random.default_rng(2)
    calib = rng.standard_normal((16, 3, 16, 16)).astype(np.float32)
    art = hwcompress.compile(model, "arm-cortex-a76", tmp_path / "art", recipe=Recipe((Int8Static(data=calib),)))
    verification = art.manifest["verification"]
    assert verification["status"] == "passed" and verification["mode"] == "emulated"
    assert len(art.manifest["quantization"]["layers"]) == 4 and art.manifest["quantization"]["float_fallback"] == []
    x = rng.standard_normal((4, 1, 3, 16, 16)).astype(np.float32)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    want = np.concatenate([sess.run(None, {"x": xi})[0] for xi in x])
    got = np.concatenate([art.run([xi])[0] for xi in x])
    assert sqnr_db(want, got) > 25.0  # the Fashion classifier's int8 output bound (test_quantize.py)
