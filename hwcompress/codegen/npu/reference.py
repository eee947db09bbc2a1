"""numpy integer reference of the NPU command stream semantics (docs/npu-command-stream.md).

Everything is int64 numpy arithmetic; the C simulator must agree bit for bit. Also holds the
helpers that turn float scale ratios into the stream's fixed-point ``(multiplier, shift)``.
"""

from __future__ import annotations

import numpy as np

from .program import Add, AvgPool2D, Conv2D, Dense, MaxPool2D, Program, validate

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def rounding_rshift(x: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """``floor((x + 2^(shift-1)) / 2^shift)`` for ``shift > 0``, ``x`` for ``shift == 0``:
    round half up (towards +inf), e.g. -2.5 -> -2, 2.5 -> 3. int64 in and out."""
    x, shift = np.asarray(x, np.int64), np.asarray(shift, np.int64)
    half = np.where(shift > 0, np.left_shift(np.int64(1), np.maximum(shift - 1, 0)), 0)
    return np.right_shift(x + half, shift)  # numpy >> on int64 is an arithmetic (floor) shift


def requantize(acc: np.ndarray, multiplier: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Saturate the accumulator to int32, then ``rounding_rshift(acc * multiplier, shift)``.
    ``multiplier``/``shift`` broadcast over the last (channel) axis."""
    acc = np.clip(np.asarray(acc, np.int64), INT32_MIN, INT32_MAX)
    return rounding_rshift(acc * np.asarray(multiplier, np.int64), shift)


def quantize_multiplier(ratio, pow2: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Fixed-point ``(multiplier, shift)`` (int32 arrays) with ``multiplier / 2^shift ~ ratio``.

    ``ratio`` is ``input_scale * weight_scale / output_scale`` (one per output channel). The
    default form has ``multiplier`` in ``[2^30, 2^31)`` (31 bits of precision, as gemmlowp);
    ``pow2=True`` rounds each ratio to the nearest power of two: ``multiplier = 1`` and only a
    shift (``multiplier = 2^k`` where the ratio is >= 1).
    """
    ratio = np.atleast_1d(np.asarray(ratio, np.float64))
    if np.any(ratio <= 0) or not np.all(np.isfinite(ratio)):
        raise ValueError("scale ratios must be positive and finite")
    if pow2:
        exp = np.round(-np.log2(ratio)).astype(np.int64)
        shift = np.clip(exp, 0, 62)
        mult = np.left_shift(np.int64(1), np.clip(-exp, 0, 30))
        return mult.astype(np.int32), shift.astype(np.int32)
    frac, exp = np.frexp(ratio)  # ratio = frac * 2^exp, frac in [0.5, 1)
    mult = np.round(frac * 2.0**31).astype(np.int64)
    exp = np.where(mult == 2**31, exp + 1, exp)  # frac rounded up to 1.0
    mult = np.where(mult == 2**31, 2**30, mult)
    shift = 31 - exp
    # ratios below 2^-31 would need shift > 62: drop precision bits instead
    extra = np.maximum(shift - 62, 0)
    mult, shift = rounding_rshift(mult, extra), shift - extra
    if np.any(shift < 0):
        raise ValueError("scale ratios >= 2^31 cannot be expressed")
    return mult.astype(np.int32), shift.astype(np.int32)


def _pad_nhwc(x: np.ndarray, padding, value: int) -> np.ndarray:
    pt, pl, pb, pr = padding
    return np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)), constant_values=value)


def _windows(x: np.ndarray, kernel, strides, dilation, out_hw):
    """Yield the strided ``[N, OH, OW, C]`` view of each kernel tap of padded ``x``."""
    (kh, kw), (sh, sw), (dh, dw), (oh, ow) = kernel, strides, dilation, out_hw
    for i in range(kh):
        for j in range(kw):
            yield i, j, x[:, i * dh: i * dh + (oh - 1) * sh + 1: sh, j * dw: j * dw + (ow - 1) * sw + 1: sw, :]


def _conv2d(p: Program, c: Conv2D, x: np.ndarray) -> np.ndarray:
    t = p.tensors
    w = t[c.weight].data.reshape(t[c.weight].shape).astype(np.int64)
    co, kh, kw, cig = w.shape
    g, n = c.groups, x.shape[0]
    oh, ow = t[c.output].shape[1:3]
    # the padding value is the input zero point, i.e. 0 once the zero point is subtracted
    xs = _pad_nhwc(x.astype(np.int64) - t[c.input].zero_point, c.padding, 0)
    acc = np.zeros((n, oh, ow, g, co // g), np.int64)
    wg = w.reshape(g, co // g, kh, kw, cig)
    for i, j, tap in _windows(xs, (kh, kw), c.strides, c.dilation, (oh, ow)):
        acc += np.einsum("nhwgc,goc->nhwgo", tap.reshape(n, oh, ow, g, cig), wg[:, :, i, j, :])
    return acc.reshape(n, oh, ow, co)


def _finish(p: Program, c, acc: np.ndarray) -> np.ndarray:
    """Bias, requantization, output zero point and the fused-activation clamp."""
    t = p.tensors
    if c.bias is not None:
        acc = acc + t[c.bias].data.astype(np.int64)
    y = requantize(acc, t[c.multiplier].data, t[c.shift].data) + t[c.output].zero_point
    return np.clip(y, c.act_min, c.act_max).astype(np.int8)


def _pool(p: Program, c, x: np.ndarray) -> np.ndarray:
    t = p.tensors
    zp = t[c.input].zero_point
    oh, ow = t[c.output].shape[1:3]
    if isinstance(c, MaxPool2D):
        xs = _pad_nhwc(x.astype(np.int64), c.padding, np.iinfo(np.int64).min)  # padding never wins
        y = np.max([tap for _, _, tap in _windows(xs, c.kernel, c.strides, (1, 1), (oh, ow))], axis=0)
    else:
        xs = _pad_nhwc(x.astype(np.int64) - zp, c.padding, 0)
        valid = _pad_nhwc(np.ones(x.shape[:3] + (1,), np.int64), c.padding, 0)
        taps = list(_windows(xs, c.kernel, c.strides, (1, 1), (oh, ow)))
        total = sum(tap for _, _, tap in taps)
        if c.count_include_pad:
            count = np.int64(c.kernel[0] * c.kernel[1])
        else:
            count = sum(v for _, _, v in _windows(valid, c.kernel, c.strides, (1, 1), (oh, ow)))
        y = zp + np.floor_divide(total + count // 2, count)  # round half up
    return np.clip(y, c.act_min, c.act_max).astype(np.int8)


def _add(p: Program, c: Add, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    t = p.tensors
    acc = ((a.astype(np.int64) - t[c.input_a].zero_point) * c.multiplier_a
           + (b.astype(np.int64) - t[c.input_b].zero_point) * c.multiplier_b)
    y = rounding_rshift(acc, c.shift) + t[c.output].zero_point
    return np.clip(y, c.act_min, c.act_max).astype(np.int8)


def run_reference(program: Program, inputs) -> list[np.ndarray]:
    """Execute ``program`` on int8 ``inputs`` (one array per program input, in order).

    Returns the int8 program outputs in order. Raises ``ValueError`` on a malformed program
    or inputs that do not match the input tensors.
    """
    validate(program)
    t = program.tensors
    if len(inputs) != len(program.inputs):
        raise ValueError(f"program takes {len(program.inputs)} inputs, got {len(inputs)}")
    env: dict[int, np.ndarray] = {}
    for tid, x in zip(program.inputs, inputs):
        x = np.asarray(x)
        if x.dtype != np.int8 or tuple(x.shape) != tuple(t[tid].shape):
            raise ValueError(f"input tensor {tid}: expected int8 {t[tid].shape}, got {x.dtype} {x.shape}")
        env[tid] = x
    for c in program.commands:
        if isinstance(c, Conv2D):
            y = _finish(program, c, _conv2d(program, c, env[c.input]))
        elif isinstance(c, Dense):
            w = t[c.weight].data.reshape(t[c.weight].shape).astype(np.int64)
            x = env[c.input].reshape(env[c.input].shape[0], -1).astype(np.int64)
            y = _finish(program, c, (x - t[c.input].zero_point) @ w.T)
        elif isinstance(c, (MaxPool2D, AvgPool2D)):
            y = _pool(program, c, env[c.input])
        else:
            y = _add(program, c, env[c.input_a], env[c.input_b])
        env[c.output] = y
    return [env[o] for o in program.outputs]
