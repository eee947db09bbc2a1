"""The CPU backend's packed NHWC conv: tile choice, weight packing, numerics vs ONNX Runtime,
and that eligible convs really run the packed kernel (and the others TOPI's)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from hwcompress.backends.cpu_conv import TILE_ATTR, ConvTile, choose_depthwise_tile, choose_tile, pack_weight

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
tvm = pytest.importorskip("tvm")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import hwcompress.frontend as fe  # noqa: E402
from hwcompress import build as B  # noqa: E402
from hwcompress.passes.layout import ConvLayout, convert_layout  # noqa: E402
from hwcompress.targets import load_target  # noqa: E402

RTOL = 1e-4  # of the output's largest magnitude: float sums reassociated


# ---------------------------------------------------------------------------- pure parts


@pytest.mark.parametrize("out_h,out_w,out_c", [(56, 56, 64), (28, 28, 128), (14, 14, 256), (7, 7, 512), (112, 112, 64), (13, 5, 24)])
@pytest.mark.parametrize("lanes,acc_regs", [(8, 12), (4, 12), (16, 24)])
def test_tile_fits_the_registers_and_the_shape(out_h, out_w, out_c, lanes, acc_regs):
    tile = choose_tile(out_h, out_w, out_c, lanes, acc_regs)
    if out_c % lanes:  # no whole vector of output channels
        assert tile is None
        return
    assert tile.ty * tile.tx * tile.nvec <= acc_regs
    assert out_h % tile.ty == 0 and out_c % tile.block == 0
    assert tile.padded_width(out_w) % tile.tx == 0 and tile.padded_width(out_w) - out_w < tile.tx


def test_tile_wastes_little_and_fills_the_registers():
    for out_w in (56, 28, 14, 112):
        tile = choose_tile(out_w, out_w, 64, 8, 12)
        assert tile.padded_width(out_w) <= out_w * 1.05 and tile.ty * tile.tx * tile.nvec >= 8


def test_unpadded_conv_avoids_rounding_its_width():
    """A conv without padding reads its input in place unless its width is rounded up to whole
    tiles (then it copies the input): MobileNetV2's 1x1 16->96 at 112x112 was 1.28x faster
    with a tile dividing 112 (one core)."""
    assert choose_tile(112, 112, 96, 8, 12).padded_width(112) > 112  # a 3x3 conv copies anyway
    tile = choose_tile(112, 112, 96, 8, 12, unpadded=True)
    assert tile.padded_width(112) == 112 and tile.ty * tile.tx * tile.nvec >= 8


def test_no_tile_without_a_whole_vector_of_channels():
    assert choose_tile(14, 14, 10, 8, 12) is None
    assert choose_depthwise_tile(14, 12, 8, 12) is None


@pytest.mark.parametrize("out_w,channels", [(112, 32), (56, 96), (28, 144), (14, 384), (7, 960), (13, 24)])
def test_depthwise_tile_fits_and_fills(out_w, channels):
    tile = choose_depthwise_tile(out_w, channels, 8, 12)
    assert tile.ty == 1 and tile.tx * tile.nvec <= 12 and channels % tile.block == 0
    assert tile.padded_width(out_w) - out_w < tile.tx
    assert tile.tx * tile.nvec >= min(7, out_w)
    if out_w % 7 == 0:  # MobileNetV2's widths: 7 pixels x one vector, no rounding (fastest measured)
        assert (tile.tx, tile.nvec) == (7, 1)


def test_pack_weight_puts_the_block_of_output_channels_last():
    w = np.arange(32 * 3 * 3 * 5, dtype=np.float32).reshape(32, 3, 3, 5)  # OHWI
    packed = pack_weight(w, 16)
    assert packed.shape == (2, 3, 3, 5, 16)
    o, ky, kx, i = 21, 2, 0, 3
    assert packed[o // 16, ky, kx, i, o % 16] == w[o, ky, kx, i]
    assert ConvTile(1, 4, 2, 8).block == 16


# ---------------------------------------------------------------------------- numerics


def _w(rng, *shape):
    return (rng.standard_normal(shape) / np.sqrt(max(np.prod(shape[1:]), 1))).astype(np.float32)


def _conv_model(cin, cout, h, w, k, stride=1, pads=(0, 0, 0, 0), dilation=1, group=1, batch=1, residual=False):
    rng = np.random.default_rng(7)
    inits = [numpy_helper.from_array(_w(rng, cout, cin // group, k, k), "w"), numpy_helper.from_array(_w(rng, cout), "b")]
    nodes = [
        helper.make_node("Conv", ["input", "w", "b"], ["c"], kernel_shape=[k, k], strides=[stride] * 2, pads=list(pads),
                         dilations=[dilation] * 2, group=group),
    ]  # fmt: skip
    out_h = (h + pads[0] + pads[2] - dilation * (k - 1) - 1) // stride + 1
    out_w = (w + pads[1] + pads[3] - dilation * (k - 1) - 1) // stride + 1
    last = "c"
    if residual:  # a second input added before the activation: the residual epilogue
        nodes.append(helper.make_node("Add", ["c", "skip"], ["a"]))
        last = "a"
    nodes.append(helper.make_node("Relu", [last], ["output"]))
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, cin, h, w])]
    if residual:
        inputs.append(helper.make_tensor_value_info("skip", TensorProto.FLOAT, [batch, cout, out_h, out_w]))
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("output", TensorProto.FLOAT, [batch, cout, out_h, out_w])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


CASES = {
    "3x3_pad": dict(cin=8, cout=16, h=20, w=20, k=3, pads=(1, 1, 1, 1)),
    "3x3_stride2_odd": dict(cin=16, cout=32, h=21, w=21, k=3, stride=2, pads=(1, 1, 1, 1)),
    "1x1_no_pad": dict(cin=32, cout=24, h=14, w=14, k=1),
    "5x5_cropped_width": dict(cin=4, cout=16, h=13, w=11, k=5, pads=(2, 2, 2, 2)),
    "7x7_stem": dict(cin=3, cout=16, h=40, w=40, k=7, stride=2, pads=(3, 3, 3, 3)),
    "dilated": dict(cin=8, cout=16, h=17, w=17, k=3, pads=(2, 2, 2, 2), dilation=2),
    "asymmetric_pads": dict(cin=8, cout=16, h=15, w=12, k=3, pads=(0, 1, 2, 0)),
    "batch2_residual": dict(cin=16, cout=16, h=9, w=9, k=3, pads=(1, 1, 1, 1), batch=2, residual=True),
    "depthwise": dict(cin=32, cout=32, h=16, w=16, k=3, pads=(1, 1, 1, 1), group=32),
    "depthwise_stride2_odd": dict(cin=24, cout=24, h=15, w=15, k=3, stride=2, pads=(1, 1, 1, 1), group=24),
    "depthwise_5x5_cropped": dict(cin=16, cout=16, h=11, w=13, k=5, pads=(2, 2, 2, 2), group=16),
    "depthwise_residual": dict(cin=16, cout=16, h=9, w=9, k=3, pads=(1, 1, 1, 1), group=16, batch=2, residual=True),
    # 7-wide outputs: the pixels as one axis (choose_flat_tile)
    "flat_1x1_7x7": dict(cin=32, cout=48, h=7, w=7, k=1),
    "flat_3x3_stride2_to_7x7": dict(cin=16, cout=32, h=13, w=13, k=3, stride=2, pads=(1, 1, 1, 1)),
    "flat_batch2_residual_7x7": dict(cin=16, cout=16, h=7, w=7, k=3, pads=(1, 1, 1, 1), batch=2, residual=True),
}


def _lowered(model):
    spec = load_target("host")
    mod = convert_layout(fe.import_onnx(model), ConvLayout("NHWC"))
    return spec, B.schedule(B.legalize(mod, spec), spec)


def _run_and_compare(model, spec, mod):
    rng = np.random.default_rng(4)
    feeds = {vi.name: rng.standard_normal([d.dim_value for d in vi.type.tensor_type.shape.dim]).astype(np.float32) for vi in model.graph.input}
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    vm = tvm.relax.VirtualMachine(B.build(mod, spec), tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(v) for v in feeds.values()]).numpy()
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=0, atol=RTOL * max(np.abs(ref).max(), 1.0))


def _conv_kernels(mod):
    return {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc) and "conv2d" in gv.name_hint}


@pytest.mark.parametrize("name", sorted(CASES))
def test_packed_conv_matches_onnxruntime(name):
    model = _conv_model(**CASES[name])
    spec, mod = _lowered(model)
    (func,) = _conv_kernels(mod).values()
    text = func.script()
    assert TILE_ATTR in text, "the eligible conv did not become the packed kernel"
    _run_and_compare(model, spec, mod)


@pytest.mark.parametrize("name", sorted(n for n in CASES if n.startswith("flat_")))
def test_seven_wide_outputs_take_a_flat_tile(name):
    """With AVX2's 16 registers (12 accumulators) a 7-wide row tile wastes pixels and these
    layers take the flat tile; on this host the build follows its own registers (AVX-512's
    32 can hold a whole 7-pixel row, which wastes nothing)."""
    from hwcompress.backends.cpu_conv import FLAT_ATTR, choose_flat_tile
    from hwcompress.backends.cpu_schedule import CpuFacts

    case = CASES[name]
    out = (case["h"] + 2 * case.get("pads", (0,))[0] - case["k"]) // case.get("stride", 1) + 1
    rows8 = choose_tile(out, out, case["cout"], 8, 12)
    assert choose_flat_tile(out, out, case["cout"], 8, 12, rows8) is not None
    facts = CpuFacts.from_target(load_target("host").tvm_target())
    lanes = facts.lanes(32) if case["cout"] % facts.lanes(32) == 0 else 8
    rows = choose_tile(out, out, case["cout"], lanes, facts.acc_regs)
    _, mod = _lowered(_conv_model(**case))
    (func,) = _conv_kernels(mod).values()
    assert (FLAT_ATTR in func.script()) == (choose_flat_tile(out, out, case["cout"], lanes, facts.acc_regs, rows) is not None)


@pytest.mark.parametrize("name", ["1x1_no_pad", "depthwise_stride2_odd"])
def test_avx512_takes_half_width_tiles_for_channels_of_8(name):
    """24 channels on AVX-512 (16 lanes): a ymm tile (8 lanes) instead of TVM's default conv;
    the tile says its lanes (``tile_attr``), the schedule vectorizes by them. Compiled for the
    x86-avx512 target (not run here unless the host has AVX-512: the host tests above do)."""
    from hwcompress.backends.cpu_conv import tile_attr

    spec = load_target("x86-avx512")
    assert CASES[name]["cout"] % 16 and CASES[name]["cout"] % 8 == 0
    mod = B.schedule(B.legalize(convert_layout(fe.import_onnx(_conv_model(**CASES[name])), ConvLayout("NHWC")), spec), spec)
    (func,) = _conv_kernels(mod).values()
    text = func.script()
    assert re.search(r'"hwc.conv_tile": \[\d+, \d+, \d+, 8\]', text), "no 8-lane packed tile"
    assert re.findall(r"T\.vectorized\(T\.int64\((\d+)\)\)", text) and set(re.findall(r"T\.vectorized\(T\.int64\((\d+)\)\)", text)) == {"8"}
    B.build(mod, spec)  # LLVM takes it
    assert tile_attr(ConvTile(1, 4, 2, 16), 16) == [1, 4, 2] and tile_attr(ConvTile(1, 4, 2, 8), 16) == [1, 4, 2, 8]


def test_flat_tile_only_on_narrow_outputs():
    from hwcompress.backends.cpu_conv import choose_flat_tile

    rows = choose_tile(7, 7, 512, 8, 12)
    assert choose_flat_tile(7, 7, 512, 8, 12, rows) is not None  # 7 wide: rows would compute 8+
    assert choose_flat_tile(14, 14, 576, 8, 12, choose_tile(14, 14, 576, 8, 12)) is None  # measured slower flat
    assert choose_flat_tile(56, 56, 64, 8, 12, choose_tile(56, 56, 64, 8, 12)) is None


def test_packed_kernel_takes_a_packed_constant_and_inlines_its_epilogue():
    model = _conv_model(cin=16, cout=32, h=16, w=16, k=3, pads=(1, 1, 1, 1), residual=True)
    _, mod = _lowered(model)
    (func,) = _conv_kernels(mod).values()
    shapes = [tuple(int(d) for d in p.shape) for p in func.params]
    assert (32 // shapes[1][-1], 3, 3, 16, shapes[1][-1]) == shapes[1]  # (O/ob, KH, KW, I, ob)
    assert func.attrs.get("tirx.is_scheduled")
    # bias add, residual add and relu are computed where the tile is written back: no block
    # of their own reads the conv output from memory again
    blocks = set(_block_names(func)) - {"root"}
    assert blocks == {"data_pad", "conv2d_nhwc_packed_init", "conv2d_nhwc_packed_update", "conv2d_nhwc_packed_intermediate_global"}
    kinds = _loop_kinds(func)
    assert {int(tvm.tirx.ForKind.PARALLEL), int(tvm.tirx.ForKind.VECTORIZED), int(tvm.tirx.ForKind.UNROLLED)} <= kinds


@pytest.mark.parametrize("case", [dict(cin=16, cout=32, h=12, w=12, k=3, pads=(1, 1, 1, 1), group=4), dict(cin=8, cout=10, h=8, w=8, k=3),
                                  dict(cin=12, cout=12, h=8, w=8, k=3, group=12)])  # fmt: skip
def test_ineligible_convs_keep_topi_and_still_match(case):
    """Grouped (not depthwise) convs, and output channels without a whole vector, stay TOPI's."""
    model = _conv_model(**case)
    spec, mod = _lowered(model)
    (func,) = _conv_kernels(mod).values()
    assert TILE_ATTR not in func.script()
    _run_and_compare(model, spec, mod)


def _block_names(func) -> list[str]:
    import re

    return re.findall(r'T\.sblock\("([^"]+)"', func.script())


def _loop_kinds(func) -> set:
    import tvm_ffi

    kinds = set()
    tvm_ffi.structural_walk(func.body, (tvm.tirx.For, lambda f: kinds.add(int(f.kind))), order="post")
    return kinds


def test_fuse_technique_leaves_packed_convs_to_fuseops():
    """The ``fuse`` recipe step would make the weight a group parameter (no packing): with the
    target given, it leaves the conv to TVM's FuseOps, which fuses the same epilogue."""
    from hwcompress.passes.fuse import fuse

    model = _conv_model(cin=16, cout=32, h=16, w=16, k=3, pads=(1, 1, 1, 1), residual=True)
    spec = load_target("host")
    mod = fuse(convert_layout(fe.import_onnx(model), ConvLayout("NHWC")), spec=spec)
    mod = B.schedule(B.legalize(mod, spec), spec)
    (func,) = _conv_kernels(mod).values()  # one kernel: conv + bias + residual add + relu
    assert TILE_ATTR in func.script()
    _run_and_compare(model, spec, mod)
