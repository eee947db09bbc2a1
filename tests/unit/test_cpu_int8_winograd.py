"""The exact int8 Winograd F(2x2, 3x3) kernel (``backends/cpu_int8_winograd.py``): bit-exact
against numpy's int64 conv on full-range and worst-case operands, picked by the int8
legalization on AVX2 hosts for the layers it is meant for, requantization fused."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tvm")

import tvm  # noqa: E402
from tvm import relax, s_tir, te  # noqa: E402

from hwcompress import build as B  # noqa: E402
from hwcompress.backends import cpu_int8_winograd as W  # noqa: E402
from hwcompress.backends.cpu_schedule import CpuFacts  # noqa: E402
from hwcompress.targets import load_target  # noqa: E402
from test_cpu_int8 import conv_ref  # noqa: E402 (the int64 numpy conv, same directory)

HOST = load_target("host")
FACTS = CpuFacts.from_target(HOST.tvm_target())
needs_avx2 = pytest.mark.skipif(
    FACTS.int8_dot is None or FACTS.int8_dot.kind.value not in ("pmaddwd", "pmaddubsw") or FACTS.int8_dot.lanes != W.LANES,
    reason="the int8 Winograd kernel is for x86 AVX2 CPUs without VNNI",
)


def _run_te(x, w, padding):
    packed = W.transform_weight(w)
    data = te.placeholder(x.shape, "uint8", "data")
    weight = te.placeholder(packed.shape, "int16", "weight")
    out = W.winograd_int8_te(data, weight, padding, w.shape[0])
    sch = s_tir.Schedule(te.create_prim_func([data, weight, out]))
    assert W.schedule_int8_winograd(sch, FACTS)
    lib = tvm.compile(sch.mod, target=HOST.tvm_target())
    result = tvm.runtime.tensor(np.zeros([int(d) for d in out.shape], np.int32))
    lib(tvm.runtime.tensor(x), tvm.runtime.tensor(packed), result)
    return result.numpy(), lib


def test_weight_transform_is_integer_and_packed():
    rng = np.random.default_rng(0)
    w = rng.integers(-128, 128, (32, 3, 3, 5)).astype(np.int8)
    u = W.transform_weight(w)
    assert u.dtype == np.int16 and u.shape == (4, 4, 2, 3, 16, 2)  # I = 5 padded to 6
    g2 = W._G2.astype(np.float64)
    ref = np.einsum("ak,okli,bl->abio", g2, w.astype(np.float64), g2)  # (4, 4, I, O)
    unpacked = u.transpose(0, 1, 3, 5, 2, 4).reshape(4, 4, 6, 32)[:, :, :5]
    np.testing.assert_array_equal(unpacked, ref)


@needs_avx2
@pytest.mark.parametrize(
    "x_shape,out_c,padding",
    [
        ((1, 12, 12, 16), 16, (1, 1, 1, 1)),
        ((1, 9, 7, 5), 32, (1, 1, 1, 1)),  # odd output (whole tiles computed, cropped), odd C
        ((2, 6, 8, 24), 16, (0, 1, 2, 0)),  # batch 2, asymmetric padding
        ((1, 16, 16, 64), 48, (1, 1, 1, 1)),  # tiles not a multiple of the GEMM rows
    ],
)
def test_kernel_is_bit_exact(x_shape, out_c, padding):
    rng = np.random.default_rng(sum(x_shape) + out_c)
    x = rng.integers(0, 256, x_shape).astype(np.uint8)
    w = rng.integers(-128, 128, (out_c, 3, 3, x_shape[3])).astype(np.int8)
    out, lib = _run_te(x, w, padding)
    np.testing.assert_array_equal(out, conv_ref(x, w, padding=padding))
    asm = lib.mod.inspect_source("asm")
    assert "vpmaddwd" in asm and "vfmadd" not in asm  # integer GEMM, no float arithmetic


@needs_avx2
@pytest.mark.parametrize("sign", [-1, 1])
def test_worst_case_operands_are_exact(sign):
    """All-255 data against all -128 / 127 weights at the channel limit: the largest
    transformed values and GEMM sums the kernel's ranges allow (int16 operands, int32 sums,
    the wrapping uint32 output transform)."""
    x = np.full((1, 4, 4, W._MAX_CHANNELS), 255, np.uint8)
    w = np.full((16, 3, 3, W._MAX_CHANNELS), -128 if sign < 0 else 127, np.int8)
    out, _ = _run_te(x, w, (1, 1, 1, 1))
    ref = conv_ref(x, w, padding=(1, 1, 1, 1))
    np.testing.assert_array_equal(out, ref)
    assert abs(ref).max() == 255 * 128 * 9 * W._MAX_CHANNELS or sign > 0


def _int8_conv_module(w, shape):
    """uint8 NHWC conv by a constant int8 OHWI weight, requantized to uint8 (the epilogue)."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "uint8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(w), data_layout="NHWC", kernel_layout="OHWI", out_dtype="int32"))
            scale = relax.const((np.arange(w.shape[0]) % 5 + 1).astype(np.float32) * 1e-4)
            y = bb.emit(relax.op.round(relax.op.multiply(relax.op.astype(y, "float32"), scale)))
            y = bb.emit(relax.op.astype(relax.op.clip(relax.op.add(y, relax.const(np.float32(128))), 0, 255), "uint8"))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


@needs_avx2
def test_legalization_uses_it_with_the_requantization_fused():
    rng = np.random.default_rng(5)
    x = rng.integers(0, 256, (1, 30, 30, 128)).astype(np.uint8)  # 28x28 output, 128 channels
    w = rng.integers(-64, 65, (128, 3, 3, 128)).astype(np.int8)
    mod = B.schedule(B.legalize(_int8_conv_module(w, x.shape), HOST), HOST)
    kernels = [f for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert len(kernels) == 1 and W.OUT_BLOCK in kernels[0].script()  # one kernel: requant is its epilogue
    out = relax.VirtualMachine(B.build(mod, HOST), tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    scale = (np.arange(128) % 5 + 1).astype(np.float32) * 1e-4
    ref = np.clip(np.round(conv_ref(x, w).astype(np.float32) * scale) + 128, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(out, ref)


def test_eligibility():
    class Attrs:
        strides, dilation, groups, padding = (1, 1), (1, 1), 1, (0, 0, 0, 0)

    class Strided(Attrs):
        strides = (2, 2)

    class Padded(Attrs):
        padding = (1, 1, 1, 1)

    assert W.eligible(Attrs, (128, 3, 3, 128), (1, 30, 30, 128))  # 28x28 output
    assert W.eligible(Padded, (256, 3, 3, 256), (1, 14, 14, 256))  # 14x14 output: 49 tiles
    assert not W.eligible(Attrs, (128, 1, 1, 128), (1, 28, 28, 128))  # 1x1
    assert not W.eligible(Attrs, (120, 3, 3, 128), (1, 30, 30, 128))  # output channels not whole blocks
    assert not W.eligible(Strided, (128, 3, 3, 128), (1, 30, 30, 128))
    assert not W.eligible(Attrs, (64, 3, 3, 64), (1, 58, 58, 64))  # too few channels for it to pay
    assert not W.eligible(Padded, (512, 3, 3, 512), (1, 7, 7, 512))  # 16 tiles: too few
    assert not W.eligible(Attrs, (128, 3, 3, W._MAX_CHANNELS + 1), (1, 30, 30, W._MAX_CHANNELS + 1))


@needs_avx2
@pytest.mark.parametrize("winograd", ["auto", "off"])
def test_winograd_off_also_turns_the_integer_kernel_off(winograd):
    """``--winograd off`` (``Optimize(winograd="off")``) reaches the backend's int8 kernels."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from hwcompress.api import import_model
    from hwcompress.optimize import Optimize
    from hwcompress.passes.quantize import Int8Static
    from hwcompress.recipe import Recipe

    rng = np.random.default_rng(7)
    w = (rng.standard_normal((128, 128, 3, 3)) * 0.05).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["y"], pads=[1, 1, 1, 1])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 128, 14, 14])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 128, 14, 14])], [numpy_helper.from_array(w, "W")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    recipe = Recipe((Int8Static(data=rng.standard_normal((2, 128, 14, 14)).astype(np.float32)),))
    front = import_model(model, HOST, recipe=recipe, optimize=Optimize(winograd=winograd))
    names = [gv.name_hint for gv, f in B.legalize(front.mod, HOST).functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert any("winograd" in n for n in names) == (winograd == "auto"), names
