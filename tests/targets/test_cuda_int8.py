"""The CUDA backend's INT8 kernels (uint8 x int8 -> int32 with ``dp4a``): weight packing and
tiles, bit-exact numerics of the TE computes and of the legalized Relax graph on this host
(llvm, no GPU), the dispatch and schedule for CUDA targets, and nvcc builds for sm_80 / sm_90
that issue ``dp4a.u32.s32``. Running on a GPU is ``tools/bench_gpu_int8.py``'s job."""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from tvm import relax, te  # noqa: E402

from hwcompress import build as B  # noqa: E402
from hwcompress.backends import cuda as cuda_backend  # noqa: E402
from hwcompress.backends.cuda_int8 import (  # noqa: E402
    TILE_ATTR,
    GemmTile,
    choose_tile,
    conv2d_nchw_int8,
    conv_out_size,
    dense_int8,
    pack_conv_weight,
    pack_dense_weight,
)
from hwcompress.targets import load_target  # noqa: E402
from cuda_code import cuda_source as _cuda_source  # noqa: E402
from cuda_code import ptx as _ptx  # noqa: E402

SM80, SM90 = load_target("cuda-sm80"), load_target("cuda-sm90")
LLVM = tvm.target.Target({"kind": "llvm"})
needs_nvcc = pytest.mark.skipif(cuda_backend.find_nvcc() is None, reason="nvcc not on PATH")


# ---------------------------------------------------------------------------- numpy references


def conv_ref(data, w_oihw, strides=(1, 1), padding=(0, 0, 0, 0), dilation=(1, 1), pad_value=0):
    """NCHW x OIHW conv in int64; ``padding`` (top, left, bottom, right) filled with ``pad_value``."""
    (sh, sw), (dh, dw), (pt, pl, pb, pr) = strides, dilation, padding
    x = np.pad(data.astype(np.int64), ((0, 0), (0, 0), (pt, pb), (pl, pr)), constant_values=pad_value)
    o, _, kh, kw = w_oihw.shape
    out_h = (x.shape[2] - dh * (kh - 1) - 1) // sh + 1
    out_w = (x.shape[3] - dw * (kw - 1) - 1) // sw + 1
    out = np.zeros((x.shape[0], o, out_h, out_w), np.int64)
    for ky in range(kh):
        for kx in range(kw):
            patch = x[:, :, ky * dh : ky * dh + (out_h - 1) * sh + 1 : sh, kx * dw : kx * dw + (out_w - 1) * sw + 1 : sw]
            out += np.einsum("nchw,oc->nohw", patch, w_oihw[:, :, ky, kx].astype(np.int64))
    return out


def _full_range(rng, shape, dtype):
    lo, hi = (0, 256) if dtype == np.uint8 else (-128, 128)
    return rng.integers(lo, hi, shape, dtype=dtype)


# ---------------------------------------------------------------------------- pure parts


def test_conv_weight_packing_puts_four_input_channels_of_one_tap_together():
    w = np.arange(10 * 5 * 3 * 3, dtype=np.int64).reshape(10, 5, 3, 3).astype(np.int8)  # OIHW, I=5
    packed = pack_conv_weight(w, k4_multiple=8, o_multiple=16)
    i4 = 2  # 5 input channels -> 2 groups of 4
    assert packed.shape == (24, 16, 4)  # 3 * 3 * 2 = 18 groups, rounded up to a step of 8; 16 channels
    for o, i, ky, kx in [(0, 0, 0, 0), (9, 4, 2, 1), (3, 2, 1, 2)]:
        assert packed[(ky * 3 + kx) * i4 + i // 4, o, i % 4] == w[o, i, ky, kx]
    assert not packed[18:].any() and not packed[:, 10:].any()  # padding: zero weights
    assert not packed[1::2, :, 1:].any()  # channels 5..7 of every tap: zero weights
    assert pack_conv_weight(w, 1).shape == (18, 10, 4)


def test_dense_weight_packing():
    w = np.arange(7 * 20).reshape(7, 20).astype(np.int8)  # (K, N)
    packed = pack_dense_weight(w, k4_multiple=8)
    assert packed.shape == (8, 20, 4)
    for k, n in [(0, 0), (6, 19), (3, 16)]:
        assert packed[k // 4, n, k % 4] == w[k, n]
    assert not packed[1, :, 3].any() and not packed[2:].any()


@pytest.mark.parametrize("batch,p,o,k4", [(1, 3136, 64, 144), (1, 196, 256, 576), (1, 49, 2048, 128), (1, 1, 1000, 128),
                                          (1, 784, 128, 144), (8, 196, 256, 576), (1, 12544, 64, 49), (1, 16, 10, 3)])
def test_tile_choice(batch, p, o, k4):
    tile = choose_tile(batch, p, o, k4)
    assert tile.threads <= 1024 and tile.step in (8, 16)
    blocks = batch * -(-p // tile.tp) * -(-o // tile.to)
    if p <= 4:  # GEMV: all rows in one block tile, 64 channels, one launch
        assert (tile.tp, tile.vp, tile.to, tile.splits) == (p, p, 64, 1)
        return
    assert (tile.vp, tile.vo) == (4, 4)  # operand words of a thread: one 16-byte load each
    assert tile.tp <= max(16, p) and tile.to <= max(16, o)  # no block mostly padding
    # split-K (a second launch) only where the GEMM alone has too few blocks
    assert tile.splits == (4 if blocks < 64 and k4 >= 2 * 4 * tile.step else 1)
    with pytest.raises(ValueError):
        GemmTile(64, 64, 3, 4, 16)


def test_tiles_of_resnet_layers():
    assert choose_tile(1, 3136, 64, 144) == GemmTile(32, 64, 4, 4, 16, 1)  # 98 blocks
    assert choose_tile(1, 196, 256, 576) == GemmTile(32, 64, 4, 4, 16, 4)  # 28 blocks: split-K
    assert choose_tile(8, 196, 256, 576).splits == 1  # batch 8: enough blocks
    assert choose_tile(1, 1, 1000, 128) == GemmTile(1, 64, 1, 1, 16, 1)


# ---------------------------------------------------------------------------- TE computes on the host

CONVS = {  # (N, C, H, W), (O, K), strides, padding (t, l, b, r), dilation
    "3x3_pad1": ((1, 16, 12, 12), (16, 3), (1, 1), (1, 1, 1, 1), (1, 1)),
    "stride2_asymmetric_pad": ((1, 8, 15, 13), (24, 3), (2, 2), (0, 1, 2, 0), (1, 1)),
    "dilation2": ((1, 8, 11, 11), (8, 3), (1, 1), (2, 2, 2, 2), (2, 2)),
    "odd_channels": ((2, 5, 7, 9), (10, 3), (1, 1), (1, 1, 1, 1), (1, 1)),  # C=5: a channel group half empty
    "1x1": ((1, 64, 7, 7), (48, 1), (1, 1), (0, 0, 0, 0), (1, 1)),
    "stem_7x7_stride2": ((1, 3, 20, 20), (16, 7), (2, 2), (3, 3, 3, 3), (1, 1)),
}


def _run_llvm(tensors, args, out_shape):
    """The TE computes built unscheduled for this host (naive loops): the kernels' semantics."""
    lib = tvm.compile(te.create_prim_func(tensors), target=LLVM)
    result = tvm.runtime.tensor(np.zeros(out_shape, np.int32))
    lib(*(tvm.runtime.tensor(a) for a in args), result)
    return result.numpy()


def _host_conv(x, wt, strides, padding, dilation, tile=None):
    kh, kw = wt.shape[2:]
    out_h, out_w = conv_out_size(x.shape[2:], (kh, kw), strides, padding, dilation)
    tile = tile or choose_tile(x.shape[0], out_h * out_w, wt.shape[0], kh * kw * -(-x.shape[1] // 4))
    packed = pack_conv_weight(wt, tile.k4_multiple, tile.to)
    data, weight = te.placeholder(x.shape, "uint8", "data"), te.placeholder(packed.shape, "int8", "weight")
    out = conv2d_nchw_int8(data, weight, (kh, kw), strides, padding, dilation, tile, wt.shape[0])
    return _run_llvm([data, weight, out], [x, packed], [int(d) for d in out.shape])


@pytest.mark.parametrize("case", sorted(CONVS))
def test_conv_compute_is_bit_exact(case):
    (n, c, h, w), (o, k), strides, padding, dilation = CONVS[case]
    rng = np.random.default_rng(sum(map(ord, case)))
    x, wt = _full_range(rng, (n, c, h, w), np.uint8), _full_range(rng, (o, c, k, k), np.int8)
    np.testing.assert_array_equal(_host_conv(x, wt, strides, padding, dilation), conv_ref(x, wt, strides, padding, dilation))


@pytest.mark.parametrize("splits", [2, 3])
def test_split_k_sums_the_slices_exactly(splits):
    (n, c, h, w), (o, k), strides, padding, dilation = CONVS["odd_channels"]
    rng = np.random.default_rng(splits)
    x, wt = _full_range(rng, (n, c, h, w), np.uint8), _full_range(rng, (o, c, k, k), np.int8)
    got = _host_conv(x, wt, strides, padding, dilation, GemmTile(16, 16, 2, 2, 4, splits))
    np.testing.assert_array_equal(got, conv_ref(x, wt, strides, padding, dilation))


@pytest.mark.parametrize("stride", [1, 2])
def test_zero_point_padding_through_a_padded_input(stride):
    """A graph pads with the zero point itself (``nn.pad``) and calls an unpadded conv."""
    rng = np.random.default_rng(stride)
    x, wt, zp = _full_range(rng, (1, 7, 10, 9), np.uint8), _full_range(rng, (12, 7, 3, 3), np.int8), 131
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (2, 0)), constant_values=zp)
    got = _host_conv(padded, wt, (stride, stride), (0, 0, 0, 0), (1, 1))
    np.testing.assert_array_equal(got, conv_ref(x, wt, (stride, stride), (1, 2, 1, 0), pad_value=zp))


def test_worst_case_sums_stay_exact():
    """All-255 activations against all -128 / all 127 weights over 9 x 64 products."""
    x = np.full((1, 64, 4, 4), 255, np.uint8)
    wt = np.concatenate([np.full((8, 64, 3, 3), -128, np.int8), np.full((8, 64, 3, 3), 127, np.int8)])
    got = _host_conv(x, wt, (1, 1), (0, 0, 0, 0), (1, 1))
    np.testing.assert_array_equal(got, conv_ref(x, wt))
    assert got.min() == 255 * -128 * 9 * 64


@pytest.mark.parametrize("m,k,n", [(1, 512, 1000), (5, 37, 20), (16, 64, 64)])
def test_dense_compute_is_bit_exact(m, k, n):
    rng = np.random.default_rng(m * k + n)
    x, wt = _full_range(rng, (m, k), np.uint8), _full_range(rng, (k, n), np.int8)
    tile = choose_tile(1, m, n, -(-k // 4))
    packed = pack_dense_weight(wt, tile.k4_multiple, tile.to)
    data, weight = te.placeholder(x.shape, "uint8", "data"), te.placeholder(packed.shape, "int8", "weight")
    out = dense_int8(data, weight, tile, n)
    np.testing.assert_array_equal(_run_llvm([data, weight, out], [x, packed], (m, n)), x.astype(np.int64) @ wt.astype(np.int64))


# ---------------------------------------------------------------------------- Relax dispatch (CUDA targets)

SCALE = 3e-5  # requantization scale of channel o: SCALE * (o % 5 + 1)


def _quantized_module(x_shape, wt, padding=(1, 1, 1, 1), strides=(1, 1), requant=False, zero_point=None, **conv):
    """uint8 NCHW conv by a constant int8 OIHW weight to int32; optionally padded with the zero
    point by ``nn.pad`` (and the conv unpadded), optionally requantized per channel to uint8
    (the epilogue FuseOps puts into the kernel)."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, str(conv.pop("dtype", "uint8"))))
    with bb.function("main", [x]):
        with bb.dataflow():
            data = x
            if zero_point is not None:
                t, left, b, r = padding
                data = bb.emit(relax.op.nn.pad(x, [0, 0, 0, 0, t, b, left, r], pad_value=float(zero_point)))
                padding = (0, 0, 0, 0)
            y = bb.emit(relax.op.nn.conv2d(data, relax.const(wt), strides=strides, padding=padding,
                                           out_dtype=conv.pop("out_dtype", "int32"), **conv))  # fmt: skip
            if requant:
                scale = relax.const((SCALE * (np.arange(wt.shape[0]) % 5 + 1)).astype(np.float32).reshape(1, -1, 1, 1))
                y = bb.emit(relax.op.round(relax.op.multiply(relax.op.astype(y, "float32"), scale)))
                y = bb.emit(relax.op.astype(relax.op.clip(relax.op.add(y, relax.const(np.float32(128))), 0, 255), "uint8"))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def _dense_module(m, wt):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((m, wt.shape[0]), "uint8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.matmul(x, relax.const(wt), out_dtype="int32"))
        bb.emit_func_output(out)
    return bb.get()


def _requant_ref(acc):
    scale = (SCALE * (np.arange(acc.shape[1]) % 5 + 1)).astype(np.float32).reshape(1, -1, 1, 1)
    return np.clip(np.round(acc.astype(np.float32) * scale) + np.float32(128), 0, 255).astype(np.uint8)


def _kernels(mod):
    return {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}


def _int8_kernel(mod):
    """The one kernel of ``mod`` that is an int8 GEMM (its script)."""
    (script,) = [f.script() for f in _kernels(mod).values() if TILE_ATTR in f.script()]
    return script


def _launches(script: str) -> int:
    """Top-level ``blockIdx`` loops of a scheduled PrimFunc: one kernel launch each."""
    lines = [ln for ln in script.splitlines() if 'thread="blockIdx' in ln]
    top = min(len(ln) - len(ln.lstrip()) for ln in lines)
    return sum(1 for ln in lines if len(ln) - len(ln.lstrip()) == top)


@pytest.mark.parametrize("x_shape,w_shape,splits", [((1, 16, 20, 20), (32, 16, 3, 3), 1), ((1, 64, 14, 14), (96, 64, 3, 3), 4)])
def test_conv_with_requantization_is_one_dp4a_kernel(x_shape, w_shape, splits):
    rng = np.random.default_rng(5)
    wt = _full_range(rng, w_shape, np.int8)
    mod = B.schedule(B.legalize(_quantized_module(x_shape, wt, requant=True), SM80), SM80)
    (func,) = _kernels(mod).values()  # conv + requantization: one kernel
    script = func.script()
    assert func.attrs.get("tirx.is_scheduled") and TILE_ATTR in script
    assert f"{TILE_ATTR}\": [" in script and script.split(f"{TILE_ATTR}\": [")[1].split("]")[0].endswith(f", {splits}")
    assert '"__dp4a"' in script  # the tensorized dot, not a scalar int loop
    assert 'scope="shared"' in script and "int8_data_shared_local" in script  # operand tiles: shared -> registers
    assert 'T.Cast("uint8"' in script  # the requantization is the kernel's epilogue
    # split-K: a second launch sums the slices (and runs the epilogue)
    assert _launches(script) == (1 if splits == 1 else 2)


@pytest.mark.parametrize("case", ["float32", "grouped", "nhwc", "int8_data"])
def test_other_convs_keep_the_default_lowering(case):
    rng = np.random.default_rng(6)
    wt = _full_range(rng, (8, 8, 3, 3), np.int8)
    kwargs = {
        "float32": dict(dtype="float32", out_dtype="float32"),
        "grouped": dict(groups=2),
        "nhwc": dict(data_layout="NHWC", kernel_layout="OIHW"),
        "int8_data": dict(dtype="int8"),
    }[case]
    if case == "float32":
        wt = wt.astype(np.float32)
    if case == "grouped":
        wt = wt[:, :4]
    shape = (1, 9, 9, 8) if case == "nhwc" else (1, 8, 9, 9)
    mod = B.legalize(_quantized_module(shape, wt, **kwargs), SM80)
    assert not any(TILE_ATTR in f.script() for f in _kernels(mod).values())


def test_legalized_graph_is_bit_exact_on_the_host():
    """The module exactly as the CUDA build legalizes it (packed weights, fused requantization,
    zero-point pad), its kernels unscheduled and built for this CPU instead."""
    rng = np.random.default_rng(7)
    x, wt = _full_range(rng, (1, 13, 11, 10), np.uint8), _full_range(rng, (20, 13, 3, 3), np.int8)
    for kwargs, ref in [
        (dict(requant=True), _requant_ref(conv_ref(x, wt, padding=(1, 1, 1, 1)))),
        (dict(zero_point=77, strides=(2, 2), padding=(1, 2, 0, 1)), conv_ref(x, wt, (2, 2), (1, 2, 0, 1), pad_value=77)),
    ]:
        mod = B.legalize(_quantized_module(x.shape, wt, **kwargs), SM80)
        assert any(TILE_ATTR in f.script() for f in _kernels(mod).values())
        got = relax.VirtualMachine(tvm.compile(mod, target=LLVM), tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
        np.testing.assert_array_equal(got, ref)
    xd, wd = _full_range(rng, (3, 70), np.uint8), _full_range(rng, (70, 33), np.int8)
    mod = B.legalize(_dense_module(3, wd), SM80)
    assert TILE_ATTR in _int8_kernel(mod)
    got = relax.VirtualMachine(tvm.compile(mod, target=LLVM), tvm.cpu())["main"](tvm.runtime.tensor(xd)).numpy()
    np.testing.assert_array_equal(got, xd.astype(np.int64) @ wd.astype(np.int64))


# ---------------------------------------------------------------------------- nvcc builds


@needs_nvcc
@pytest.mark.parametrize("spec", [SM80, SM90], ids=["sm_80", "sm_90"])
def test_nvcc_builds_dp4a_kernels(spec, tmp_path):
    rng = np.random.default_rng(8)
    conv = _quantized_module((1, 64, 14, 14), _full_range(rng, (96, 64, 3, 3), np.int8), requant=True)
    dense = _dense_module(1, _full_range(rng, (512, 1000), np.int8))  # GEMV, split-K
    for mod in (conv, dense):
        mod = B.schedule(B.legalize(mod, spec), spec)
        ex = B.build(mod, spec)
        ptx = _ptx(_cuda_source(ex), spec.tvm["arch"])
        assert "dp4a.u32.s32" in ptx  # u8 activations x s8 weights
        assert "ld.local" not in ptx and "st.local" not in ptx  # operand words and sums stay in registers
        assert "ld.shared.v4" in ptx or "ld.shared.u32" in ptx or "ld.shared.b32" in ptx
    path = tmp_path / "module.so"
    cuda_backend.BACKEND.export(ex, path, spec)
    assert cuda_backend.device_archs(path) == {spec.tvm["arch"]}
