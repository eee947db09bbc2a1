"""NPU command stream: format round trip and errors, reference semantics on hand-computed
cases, the cycle model, and the simulator source compiling as strict C11 / C++ / aarch64."""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

from hwcompress.codegen.npu import (
    Activation,
    Add,
    AvgPool2D,
    Conv2D,
    Dense,
    MaxPool2D,
    Program,
    activation_bounds,
    command_cycles,
    cycles,
    decode,
    encode,
    npu_c_source,
    quantize_multiplier,
    requantize,
    rounding_rshift,
    run_reference,
    validate,
)
from hwcompress.targets import Npu, load_target


def _conv_program(pow2=False) -> Program:
    p = Program(pow2_scales=pow2)
    x = p.add_tensor((1, 4, 4, 3), zero_point=-3)
    w = p.add_constant(np.arange(10 * 3 * 3 * 3).reshape(10, 3, 3, 3).astype(np.int8))
    b = p.add_constant(np.arange(10, dtype=np.int32) - 5)
    m = p.add_constant(np.full(10, 1 if pow2 else 1 << 30, np.int32))
    s = p.add_constant(np.full(10, 8 if pow2 else 38, np.int32))
    y = p.add_tensor((1, 2, 2, 10), zero_point=4)
    p.add(Conv2D(x, w, b, m, s, y, strides=(2, 2), padding=(1, 1, 0, 0), act_min=4))
    z = p.add_tensor((1, 1, 1, 10), zero_point=4)
    p.add(AvgPool2D(y, z, (2, 2), (2, 2), count_include_pad=True))
    p.inputs, p.outputs = [x], [z]
    return p


# ------------------------------------------------------------------------------ format


@pytest.mark.parametrize("pow2", [False, True])
def test_encode_decode_round_trip(pow2):
    p = _conv_program(pow2)
    blob = encode(p)
    assert blob[:4] == b"HWNP" and struct.unpack_from("<HH", blob, 4) == (1, 0)
    assert struct.unpack_from("<I", blob, 12)[0] == len(blob)
    q = decode(blob)
    assert q.tensors == p.tensors and q.commands == p.commands
    assert (q.inputs, q.outputs, q.pow2_scales) == (p.inputs, p.outputs, pow2)
    assert encode(q) == blob


def test_decoded_constants_are_aligned_and_little_endian():
    blob = encode(_conv_program())
    data_off = struct.unpack_from("<I", blob, 32)[0]
    assert data_off % 16 == 0
    bias = decode(blob).tensors[2].data
    assert bias.dtype == np.int32 and list(bias[:2]) == [-5, -4]


@pytest.mark.parametrize("mutate, message", [
    (lambda b: b"XXXX" + b[4:], "magic"),
    (lambda b: b[:4] + struct.pack("<H", 2) + b[6:], "version 2.0"),
    (lambda b: b[:6] + struct.pack("<H", 1) + b[8:], "version 1.1"),
    (lambda b: b[:8] + struct.pack("<I", 6) + b[12:], "unknown flags"),
    (lambda b: b[:20], "truncated"),
    (lambda b: b[:-1], "truncated"),
])
def test_bad_streams_raise_value_error(mutate, message):
    with pytest.raises(ValueError, match=message):
        decode(mutate(encode(_conv_program())))


def test_bad_opcode_and_field_count():
    p = _conv_program()
    blob = bytearray(encode(p))
    first_cmd = 40 + 4 * 2 + 32 * len(p.tensors)
    bad = blob.copy()
    struct.pack_into("<H", bad, first_cmd, 9)
    with pytest.raises(ValueError, match="unknown opcode 9"):
        decode(bytes(bad))
    struct.pack_into("<HH", blob, first_cmd, 1, 16)
    with pytest.raises(ValueError, match="16 fields, expected 17"):
        decode(bytes(blob))


def test_validate_rejects_bad_programs():
    p = _conv_program()
    p.commands.append(p.commands[0])
    with pytest.raises(ValueError, match="written twice"):
        validate(p)
    p = _conv_program()
    p.commands.reverse()
    with pytest.raises(ValueError, match="before it is written"):
        validate(p)
    p = _conv_program()
    p.pow2_scales = True  # multipliers are 2^30: a power of two, fine; make one not
    p.tensors[3] = type(p.tensors[3])((10,), p.tensors[3].dtype, 0, np.full(10, 3, np.int32))
    with pytest.raises(ValueError, match="not a power of two"):
        validate(p)
    p = _conv_program()
    p.tensors[5] = type(p.tensors[5])((1, 3, 3, 10), p.tensors[5].dtype, 4)
    with pytest.raises(ValueError, match=r"command makes \(1, 2, 2, 10\)"):
        validate(p)


# ------------------------------------------------------------------------------ semantics


def test_rounding_shift_rounds_half_up_also_for_negatives():
    x = np.array([-5, -4, -3, -1, 1, 3, 5, 7])
    assert rounding_rshift(x, 1).tolist() == [-2, -2, -1, 0, 1, 2, 3, 4]  # -2.5 -> -2, 2.5 -> 3
    assert rounding_rshift(x, 0).tolist() == x.tolist()
    assert rounding_rshift(np.array([-6, -5, 5, 6]), 2).tolist() == [-1, -1, 1, 2]  # -1.5 -> -1


def test_requantize_saturates_the_int32_accumulator_first():
    acc = np.array([2**40, -(2**40), 1000])
    out = requantize(acc, np.array([1 << 30, 1 << 30, 1 << 30]), np.array([31, 31, 31]))
    assert out.tolist() == [2**30, -(2**30), 500]


def test_quantize_multiplier():
    ratio = np.array([0.3, 0.0123, 1.7, 2.0**-40])
    m, s = quantize_multiplier(ratio)
    assert m.dtype == np.int32 and np.all(s <= 62)
    assert np.all(m[:3] >= 2**30)
    np.testing.assert_allclose(m / 2.0**s, ratio, rtol=1e-6)
    m, s = quantize_multiplier([0.3, 0.0123, 1.7, 3.1], pow2=True)
    assert m.tolist() == [1, 1, 2, 4] and s.tolist() == [2, 6, 0, 0]


def test_activation_bounds():
    assert activation_bounds(Activation.NONE, 5, 0.1) == (-128, 127)
    assert activation_bounds(Activation.RELU, -10, 0.1) == (-10, 127)
    assert activation_bounds(Activation.RELU6, -10, 0.05) == (-10, 110)
    assert activation_bounds(Activation.RELU6, 0, 0.01) == (0, 127)


def _single(cmd_fn, x_shape, zp_in, out_shape, zp_out, consts=()):
    p = Program()
    x = p.add_tensor(x_shape, zp_in)
    ids = [p.add_constant(c) for c in consts]
    y = p.add_tensor(out_shape, zp_out)
    p.add(cmd_fn(x, ids, y))
    p.inputs, p.outputs = [x], [y]
    return p


def test_conv_padding_is_the_input_zero_point():
    # 3x3 kernel of ones on a 1x1 input, padding 1: the 8 padded taps contribute nothing
    w, b = np.ones((1, 3, 3, 1), np.int8), np.array([10], np.int32)
    m, s = np.array([1], np.int32), np.array([1], np.int32)
    p = _single(lambda x, c, y: Conv2D(x, c[0], c[1], c[2], c[3], y, padding=(1, 1, 1, 1)),
                (1, 1, 1, 1), 5, (1, 1, 1, 1), -2, (w, b, m, s))
    # (x - zp) + bias = (8 - 5) + 10 = 13; 13 / 2 = 6.5 -> 7; + zp_out = 5
    assert run_reference(p, [np.array([[[[8]]]], np.int8)])[0].item() == 5


def test_dense_requant_of_negative_accumulators():
    w = np.array([[1, 1], [-1, -1]], np.int8)
    m, s = np.array([1, 1], np.int32), np.array([2, 2], np.int32)
    p = _single(lambda x, c, y: Dense(x, c[0], None, c[1], c[2], y, act_min=-2), (1, 2), 0, (1, 2), 0, (w, m, s))
    # acc = [5, -5]; /4 = 1.25 -> 1, -1.25 -> -1; then clamp at -2 does nothing
    assert run_reference(p, [np.array([[2, 3]], np.int8)])[0].tolist() == [[1, -1]]
    # acc = [-6, 6]: -1.5 -> -1 (half up), 1.5 -> 2
    assert run_reference(p, [np.array([[-2, -4]], np.int8)])[0].tolist() == [[-1, 2]]


def test_pools_padding_and_rounding():
    x = np.array([-100, -100, -100, -101], np.int8).reshape(1, 2, 2, 1)
    mp = _single(lambda x, c, y: MaxPool2D(x, y, (2, 2), (1, 1), (1, 1, 0, 0)), (1, 2, 2, 1), 3, (1, 2, 2, 1), 3)
    assert run_reference(mp, [x])[0].ravel().tolist() == [-100] * 4  # padding never wins
    x = np.array([0, 1, 0, 0], np.int8).reshape(1, 2, 2, 1)  # zp 1: x - zp = [-1, 0, -1, -1]
    ap = _single(lambda x, c, y: AvgPool2D(x, y, (1, 2), (1, 2)), (1, 2, 2, 1), 1, (1, 2, 1, 1), 1)
    # windows sum -1 over 2 -> -0.5 -> 0 (half up); -2 over 2 -> -1
    assert run_reference(ap, [x])[0].ravel().tolist() == [1, 0]
    ai = _single(lambda x, c, y: AvgPool2D(x, y, (2, 2), (1, 1), (0, 0, 1, 1), count_include_pad=True),
                 (1, 2, 2, 1), 1, (1, 2, 2, 1), 1)
    # padded taps count but add 0: -3/4 -> -1 (then + zp); -1/4, -2/4 and -1/4 round to 0
    assert run_reference(ai, [x])[0].ravel().tolist() == [0, 1, 1, 1]


def test_add_with_own_scales():
    p = Program()
    a, b, y = p.add_tensor((1, 3), 10), p.add_tensor((1, 3), -10), p.add_tensor((1, 3), 1)
    p.add(Add(a, b, y, multiplier_a=3, multiplier_b=1, shift=2, act_min=1))
    p.inputs, p.outputs = [a, b], [y]
    out = run_reference(p, [np.array([[12, 10, 8]], np.int8), np.array([[-10, -11, -16]], np.int8)])
    # (2*3 + 0)/4 = 1.5 -> 2; (0 - 1)/4 -> 0; (-6 - 6)/4 = -3 -> clamp at act_min 1 (relu)
    assert out[0].tolist() == [[3, 1, 1]]


# ------------------------------------------------------------------------------ cost model


def test_cycles_formula_pads_channels_to_the_npu_multiples():
    npu = Npu(in_channel_multiple=4, out_channel_multiple=16, macs_per_cycle=1024, bytes_per_cycle=64)
    per = command_cycles(_conv_program(), npu)
    # conv: 2x2 outputs x 16 (10 padded) x 3x3 x 4 (3 padded) = 2304 MACs -> 3 cycles;
    # bytes: in 48 + w 270 + bias/mult/shift 3*40 + out 40 = 478 -> 8 cycles
    # avg pool: 1x1 x 16 x 2x2 = 64 -> 1; bytes 40 + 10 = 50 -> 1
    assert per == [8, 1]
    assert cycles(_conv_program(), npu) == 9
    big = Npu(in_channel_multiple=4, out_channel_multiple=16, macs_per_cycle=16, bytes_per_cycle=64)
    assert command_cycles(_conv_program(), big)[0] == 2304 // 16


def test_cycles_depthwise_maps_channels_to_output_lanes():
    p = Program()
    x, y = p.add_tensor((1, 4, 4, 8)), p.add_tensor((1, 4, 4, 8))
    ids = [p.add_constant(np.ones((8, 3, 3, 1), np.int8)), p.add_constant(np.ones(1, np.int32)),
           p.add_constant(np.zeros(1, np.int32))]
    p.add(Conv2D(x, ids[0], None, ids[1], ids[2], y, padding=(1, 1, 1, 1), groups=8))
    p.inputs, p.outputs = [x], [y]
    npu = Npu(in_channel_multiple=4, out_channel_multiple=16, macs_per_cycle=8, bytes_per_cycle=1024)
    assert command_cycles(p, npu) == [4 * 4 * 16 * 9 // 8]


def test_cycles_needs_a_cost_model():
    with pytest.raises(ValueError, match="macs_per_cycle"):
        cycles(_conv_program(), Npu())
    assert cycles(_conv_program(), load_target("npu-stub").npu) > 0


# ------------------------------------------------------------------------------ C source


def _compilers():
    out = [("gcc", ["-std=c11", "-pedantic"]), ("g++", ["-x", "c++"])]
    if shutil.which("aarch64-linux-gnu-gcc"):
        out.append(("aarch64-linux-gnu-gcc", ["-std=c11"]))
    return [c for c in out if shutil.which(c[0])]


@pytest.mark.parametrize("cc, flags", _compilers(), ids=lambda v: v if isinstance(v, str) else "")
def test_generated_source_compiles_warning_free(tmp_path, cc, flags):
    import tvm_ffi.libinfo as info

    src = tmp_path / "npu.c"
    src.write_text(npu_c_source([("npu_a", _conv_program()), ("npu_b", _conv_program(True))]))
    cmd = [cc, *flags, "-Wall", "-Wextra", "-Werror", "-O1", "-c", str(src), "-o", str(tmp_path / "npu.o"),
           "-I" + info.find_include_path(), "-I" + info.find_dlpack_include_path()]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_bad_symbol_names_are_rejected():
    with pytest.raises(ValueError, match="C identifier"):
        npu_c_source([("npu-0", _conv_program())])
    with pytest.raises(ValueError, match="C identifier"):
        npu_c_source([("f", _conv_program()), ("f", _conv_program())])


def test_import_does_not_load_tvm():
    code = "import sys, hwcompress.codegen.npu; assert 'tvm' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
