"""The NPU simulator inside a TVM module: Relax VM -> call_dps_packed -> C simulator, bit-exact
with the numpy reference on random int8 layers.

All cases share one library (one external function and one Relax function per case), so the
module is compiled and exported once.
"""

from __future__ import annotations

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
    npu_runtime_module,
    quantize_multiplier,
    run_reference,
)

tvm = pytest.importorskip("tvm")
relax = tvm.relax

RNG = np.random.default_rng(8)


def _int8(shape):
    return RNG.integers(-128, 128, shape).astype(np.int8)


def _layer(p: Program, cls, x: int, w_shape, out_shape, zp_out: int, act=Activation.NONE,
           scale_out=0.05, pow2=False, **kw) -> int:
    """A conv/dense command with random weights, bias and realistic requant scales."""
    w = RNG.integers(-127, 128, w_shape).astype(np.int8)
    fan_in = int(np.prod(w_shape[1:]))
    ratio = RNG.uniform(0.5, 2.0, w_shape[0]) / (fan_in * 40.0)  # keeps outputs mostly in range
    mult, shift = quantize_multiplier(ratio, pow2=pow2)
    bias = p.add_constant(RNG.integers(-3000, 3000, w_shape[0]).astype(np.int32))
    y = p.add_tensor(out_shape, zp_out)
    lo, hi = activation_bounds(act, zp_out, scale_out)
    p.add(cls(x, p.add_constant(w), bias, p.add_constant(mult), p.add_constant(shift), y,
              act_min=lo, act_max=hi, **kw))
    return y


def _case_conv3x3():
    p = Program()
    x = p.add_tensor((1, 9, 7, 6), zero_point=-7)
    p.inputs, p.outputs = [x], [_layer(p, Conv2D, x, (16, 3, 3, 6), (1, 9, 7, 16), -20, Activation.RELU,
                                       padding=(1, 1, 1, 1))]
    return p


def _case_conv_strided_grouped_pow2():
    p = Program(pow2_scales=True)
    x = p.add_tensor((2, 11, 10, 8), zero_point=13)
    y = _layer(p, Conv2D, x, (12, 3, 2, 4), (2, 4, 5, 12), 3, Activation.RELU6, pow2=True,
               strides=(2, 2), padding=(1, 0, 0, 1), dilation=(2, 1), groups=2)
    p.inputs, p.outputs = [x], [y]
    return p


def _case_depthwise():
    p = Program()
    x = p.add_tensor((1, 8, 8, 8), zero_point=4)
    p.inputs, p.outputs = [x], [_layer(p, Conv2D, x, (8, 3, 3, 1), (1, 8, 8, 8), -9, Activation.RELU6,
                                       padding=(1, 1, 1, 1), groups=8)]
    return p


def _case_dense():
    p = Program()
    x = p.add_tensor((3, 40), zero_point=-1)
    p.inputs, p.outputs = [x], [_layer(p, Dense, x, (10, 40), (3, 10), 7)]
    return p


def _case_max_pool():
    p = Program()
    x = p.add_tensor((1, 9, 9, 5), zero_point=-11)
    y = p.add_tensor((1, 5, 5, 5), zero_point=-11)
    p.add(MaxPool2D(x, y, (3, 3), (2, 2), (1, 1, 1, 1), act_min=-11))  # relu at the zero point
    p.inputs, p.outputs = [x], [y]
    return p


def _case_avg_pool():
    p = Program()
    x = p.add_tensor((2, 7, 7, 4), zero_point=6)
    y = p.add_tensor((2, 4, 4, 4), zero_point=6)
    z = p.add_tensor((2, 4, 4, 4), zero_point=6)
    p.add(AvgPool2D(x, y, (2, 2), (2, 2), (0, 0, 1, 1)))
    p.add(AvgPool2D(x, z, (3, 3), (2, 2), (1, 1, 1, 1), count_include_pad=True))
    p.inputs, p.outputs = [x], [y, z]
    return p


def _case_add(pow2: bool):
    p = Program(pow2_scales=pow2)
    a, b = p.add_tensor((2, 5, 3, 4), -30), p.add_tensor((2, 5, 3, 4), 17)
    y = p.add_tensor((2, 5, 3, 4), -4)
    mult, shift = quantize_multiplier([0.7, 0.45], pow2=pow2)
    if not pow2:  # both inputs share the output shift: express b's ratio with a's shift
        mult = np.array([mult[0], round(0.45 * 2.0 ** int(shift[0]))])
    lo, hi = activation_bounds(Activation.RELU, -4, 0.1)
    p.add(Add(a, b, y, int(mult[0]), int(mult[1]), int(shift[0]), act_min=lo, act_max=hi))
    p.inputs, p.outputs = [a, b], [y]
    return p


def _case_conv_pool_dense():
    p = Program()
    x = p.add_tensor((1, 12, 12, 3), zero_point=-2)
    c = _layer(p, Conv2D, x, (16, 3, 3, 3), (1, 12, 12, 16), -128, Activation.RELU, padding=(1, 1, 1, 1))
    m = p.add_tensor((1, 6, 6, 16), zero_point=-128)
    p.add(MaxPool2D(c, m, (2, 2), (2, 2)))
    a = p.add_tensor((1, 3, 3, 16), zero_point=-128)
    p.add(AvgPool2D(m, a, (2, 2), (2, 2)))
    d = _layer(p, Dense, a, (10, 3 * 3 * 16), (1, 10), 5)  # NHWC input read as [N, H*W*C]
    p.inputs, p.outputs = [x], [a, d]
    return p


CASES = {
    "conv3x3": _case_conv3x3(),
    "conv_strided_grouped_pow2": _case_conv_strided_grouped_pow2(),
    "depthwise": _case_depthwise(),
    "dense": _case_dense(),
    "max_pool": _case_max_pool(),
    "avg_pool": _case_avg_pool(),
    "add": _case_add(False),
    "add_pow2": _case_add(True),
    "conv_pool_dense": _case_conv_pool_dense(),
}


def _tensor_type(program: Program, tid: int):
    return relax.TensorType(program.tensors[tid].shape, "int8")


def _relax_module(cases: dict[str, Program]):
    """One Relax function per case calling ``npu_<case>`` the way RunCodegen rewrites BYOC
    calls: ``call_dps_packed(ExternFunc(symbol), args, out_ty)``; the module goes in the
    ``external_mods`` attribute."""
    bb = relax.BlockBuilder()
    for name, p in cases.items():
        params = [relax.Var(f"x{i}", _tensor_type(p, t)) for i, t in enumerate(p.inputs)]
        outs = [_tensor_type(p, t) for t in p.outputs]
        with bb.function(name, params):
            call = relax.call_dps_packed(relax.ExternFunc(f"npu_{name}"), relax.Tuple(params),
                                         outs if len(outs) > 1 else outs[0])
            bb.emit_func_output(bb.emit(call))
    ext = npu_runtime_module([(f"npu_{name}", p) for name, p in cases.items()])
    return bb.get().with_attr("external_mods", [ext])


@pytest.fixture(scope="module")
def vm(tmp_path_factory):
    from hwcompress.targets import load_target

    exe = tvm.compile(_relax_module(CASES), target=load_target("host").tvm_target())
    path = tmp_path_factory.mktemp("npu") / "module.so"
    exe.export_library(str(path), options=["-O2"])
    lib = tvm.runtime.load_module(str(path))
    return relax.VirtualMachine(lib, tvm.cpu()), lib


@pytest.mark.parametrize("name", list(CASES))
def test_simulator_matches_reference_bit_exactly(vm, name):
    machine, _ = vm
    program = CASES[name]
    inputs = [_int8(program.tensors[t].shape) for t in program.inputs]
    expected = run_reference(program, inputs)
    got = machine[name](*[tvm.runtime.tensor(x) for x in inputs])
    got = [got] if len(expected) == 1 else list(got)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        g = g.numpy()
        assert g.dtype == np.int8 and g.shape == e.shape
        np.testing.assert_array_equal(g, e)  # bit-exact: tolerance 0
    # the layers are scaled so that outputs are not all saturated: the test means something
    assert len(np.unique(expected[-1])) > 4


def test_bad_arguments_raise_a_clear_error(vm):
    _, lib = vm
    fn = lib.get_function("npu_dense", query_imports=True)
    x, y = np.zeros((3, 41), np.int8), np.zeros((3, 10), np.int8)
    with pytest.raises(ValueError, match="npu_dense: .*argument 0 has the wrong shape"):
        fn(tvm.runtime.tensor(x), tvm.runtime.tensor(y))
    with pytest.raises(ValueError, match="expected inputs \\+ outputs arguments"):
        fn(tvm.runtime.tensor(y))


def test_module_is_c_source_listing_its_functions():
    mod = npu_runtime_module("npu_fn_0", CASES["dense"])
    assert mod.kind == "c"
    assert "__tvm_ffi_npu_fn_0" in mod.inspect_source()
    assert mod.get_function("get_func_names")() == ["npu_fn_0"]


def _harness(program: Program) -> str:
    """A main() that runs ``npu_fn`` on raw int8 inputs from stdin, writes outputs to stdout
    (no TVM runtime: the FFI error hook is stubbed)."""
    ts = [program.tensors[t] for t in program.inputs + program.outputs]
    decl = "".join(
        f"static int8_t d{i}[{int(np.prod(t.shape))}]; static int64_t s{i}[] = {{{', '.join(map(str, t.shape))}}};\n"
        for i, t in enumerate(ts))
    setup = "".join(
        f"  a[{i}].type_index = kTVMFFIDLTensorPtr; a[{i}].v_ptr = &t[{i}]; t[{i}].data = d{i};"
        f" t[{i}].ndim = {len(t.shape)}; t[{i}].shape = s{i}; t[{i}].dtype.code = kDLInt;"
        f" t[{i}].dtype.bits = 8; t[{i}].dtype.lanes = 1; t[{i}].device.device_type = kDLCPU;\n"
        for i, t in enumerate(ts))
    n_in = len(program.inputs)
    io = "".join(f"  if (fread(d{i}, 1, sizeof d{i}, stdin) != sizeof d{i}) return 3;\n" for i in range(n_in))
    io_out = "".join(f"  fwrite(d{i}, 1, sizeof d{i}, stdout);\n" for i in range(n_in, len(ts)))
    return (
        "void TVMFFIErrorSetRaisedFromCStr(const char* kind, const char* msg) { fprintf(stderr, \"%s: %s\\n\", kind, msg); }\n"
        + decl + f"int main(void) {{\n  TVMFFIAny a[{len(ts)}]; DLTensor t[{len(ts)}];\n"
        + f"  memset(a, 0, sizeof a); memset(t, 0, sizeof t);\n{setup}{io}"
        + f"  if (__tvm_ffi_npu_fn(NULL, a, {len(ts)}, NULL) != 0) return 2;\n{io_out}  return 0;\n}}\n")


@pytest.mark.qemu
@pytest.mark.parametrize("name", ["conv_strided_grouped_pow2", "depthwise", "add", "conv_pool_dense"])
def test_simulator_bit_exact_on_aarch64(tmp_path, name):
    import shutil
    import subprocess

    import tvm_ffi.libinfo as info

    from hwcompress.codegen.npu import npu_c_source

    if not (shutil.which("aarch64-linux-gnu-gcc") and shutil.which("qemu-aarch64")):
        pytest.skip("needs aarch64-linux-gnu-gcc and qemu-aarch64")
    program = CASES[name]
    src = tmp_path / "sim.c"
    src.write_text(npu_c_source([("npu_fn", program)]) + _harness(program))
    exe = tmp_path / "sim"
    subprocess.run(["aarch64-linux-gnu-gcc", "-std=c11", "-O2", "-static", str(src), "-o", str(exe),
                    "-I" + info.find_include_path(), "-I" + info.find_dlpack_include_path()], check=True)
    inputs = [_int8(program.tensors[t].shape) for t in program.inputs]
    res = subprocess.run(["qemu-aarch64", str(exe)], input=b"".join(x.tobytes() for x in inputs),
                         capture_output=True, timeout=120)
    assert res.returncode == 0, res.stderr.decode()
    got, pos = [], 0
    for e in run_reference(program, inputs):
        got.append(np.frombuffer(res.stdout, np.int8, e.size, pos).reshape(e.shape))
        pos += e.size
        np.testing.assert_array_equal(got[-1], e)
    assert pos == len(res.stdout)
