"""Resize by ``scales`` -> Resize by ``sizes`` that TVM computes correctly.

TVM's importer turns scales into sizes and then maps output to input coordinates with the
ratio ``in/out`` of those sizes, not with the given scale; they differ whenever ``in * scale``
is not an integer (``2 * 0.6 -> 1``: ONNX maps with 0.6, TVM with 0.5), and ``align_corners``
to a size of 1 divides by zero. Every ONNX coordinate mode is affine, ``x_in = a + b * x_out``,
and so is ``tf_crop_and_resize`` with a chosen roi; where TVM's ratio would differ, the rewrite
expresses the exact affine map as a roi. (ONNX's reference takes the unrounded output length
``in * scale`` in ``align_corners``; so does this rewrite.) TVM's
``tf_crop_and_resize`` divides by ``out - 1`` even for an output length of 1, so such axes are
resized to a longer length and sliced back (see ``_crop_len``). Coordinates outside the image are clamped in ONNX but
extrapolated in ``tf_crop_and_resize``; those graphs are edge-padded by two pixels first, which
is how ONNX's reference reads neighbours outside the image (not valid with ``exclude_outside``,
left as TVM imports it).
"""

from __future__ import annotations

import logging
import math

import numpy as np
import onnx

from ..graph import GraphView, NodeBuilder, attrs_of, node_input

log = logging.getLogger(__name__)

_PAD = 2  # cubic reads two neighbours beyond the coordinate's floor
_AFFINE_MODES = ("half_pixel", "pytorch_half_pixel", "asymmetric", "tf_half_pixel_for_nn", "align_corners")


def _scales_of(node: onnx.NodeProto, view: GraphView) -> np.ndarray | None:
    scales = view.const(node_input(node, 2))
    sizes = node_input(node, 3)
    if scales is None or scales.size == 0 or (sizes and view.const(sizes) is None):
        return None
    if sizes and view.const(sizes).size:
        return None
    return scales.astype(np.float32).reshape(-1)


def match_resize_scales(node: onnx.NodeProto, view: GraphView) -> bool:
    if view.opset < 11 or view.shape(node.input[0]) is None:
        return False
    attrs = attrs_of(node)
    mode = attrs.get("coordinate_transformation_mode", "half_pixel")
    if attrs.get("antialias", 0) or attrs.get("keep_aspect_ratio_policy", "stretch") != "stretch":
        return False
    if mode != "tf_crop_and_resize" and mode not in _AFFINE_MODES:
        return False
    if mode == "tf_crop_and_resize" and view.const(node_input(node, 1)) is None:
        return False
    return _scales_of(node, view) is not None


def _full(values, axes, rank: int, fill) -> list:
    out = [fill] * rank
    for ax, v in zip(axes, values):
        out[ax % rank] = v
    return out


def output_sizes(in_shape, scales, roi=None) -> list[int]:
    """ONNX's ``floor(in * (roi_end - roi_start) * scale)``, in float32 as ONNX Runtime does."""
    rank = len(in_shape)
    extent = [1.0] * rank if roi is None else [float(roi[rank + i] - roi[i]) for i in range(rank)]
    return [int(math.floor(np.float32(d) * np.float32(e) * np.float32(s))) for d, e, s in zip(in_shape, extent, scales)]


def affine_map(mode: str, scale: float, in_len: int, out_len: float) -> tuple[float, float]:
    """``(a, b)`` with ``x_in = a + b * x_out`` for an ONNX coordinate transformation mode.

    ``out_len`` is the output length the mode divides by: ``in_len * scale`` before rounding
    when Resize is given scales (as ONNX's reference computes), the size when given sizes.
    """
    if mode == "align_corners":
        return (0.0, (in_len - 1) / (out_len - 1)) if out_len > 1 else (0.0, 0.0)
    if mode == "pytorch_half_pixel" and out_len <= 1:
        return 0.0, 0.0
    offset = {"half_pixel": 0.5 / scale - 0.5, "pytorch_half_pixel": 0.5 / scale - 0.5,
              "asymmetric": 0.0, "tf_half_pixel_for_nn": 0.5 / scale}[mode]
    return offset, 1.0 / scale


def crop_roi(maps, in_shape, out_shape) -> list[float]:
    """The ``tf_crop_and_resize`` roi (starts then ends, all axes) giving the affine maps."""
    starts, ends = [], []
    for (a, b), n_in, n_out in zip(maps, in_shape, out_shape):
        if n_in <= 1:  # the whole axis is one pixel: every coordinate reads it
            start, end = 0.0, 1.0
        else:
            start = a / (n_in - 1)
            end = start + b * (n_out - 1) / (n_in - 1)
        starts.append(start)
        ends.append(end)
    return starts + ends


def rewrite_resize_scales(node: onnx.NodeProto, b: NodeBuilder) -> None:
    view = b.view
    x = node.input[0]
    in_shape = list(view.shape(x))
    rank = len(in_shape)
    attrs = attrs_of(node)
    axes = attrs.pop("axes", list(range(rank)))
    mode = attrs.get("coordinate_transformation_mode", "half_pixel")
    scales = [float(s) for s in _full(_scales_of(node, view), axes, rank, 1.0)]
    roi_in = view.const(node_input(node, 1)) if mode == "tf_crop_and_resize" else None
    if roi_in is not None and roi_in.size != 2 * rank:
        roi_in = np.array(_full(roi_in[: len(axes)], axes, rank, 0.0) + _full(roi_in[len(axes):], axes, rank, 1.0))
    out_shape = list(view.shape(node.output[0]) or output_sizes(in_shape, scales, roi_in))
    sizes = b.const("sizes", np.array(out_shape, np.int64))
    roi = "" if roi_in is None else b.const("roi", roi_in.astype(np.float32))
    if mode == "tf_crop_and_resize" or any(s != 1.0 for s in scales[:2]):
        b.op("Resize", [x, roi, "", sizes], outputs=list(node.output), **attrs)
        return

    # ONNX's reference divides by the unrounded length in align_corners; its output-length-1
    # test in pytorch_half_pixel follows ONNX Runtime and the spec text (the rounded length).
    wanted = [affine_map(mode, s, n, n * s if mode == "align_corners" else m) for s, n, m in zip(scales, in_shape, out_shape)]
    tvm_uses = [affine_map(mode, m / n, n, m) if n and m else (0.0, 0.0) for n, m in zip(in_shape, out_shape)]
    exact = all(math.isclose(p, q, rel_tol=1e-9, abs_tol=1e-12) for w, t in zip(wanted, tvm_uses) for p, q in zip(w, t))
    if exact and not (mode == "align_corners" and 1 in out_shape[2:]):
        b.op("Resize", [x, roi, "", sizes], outputs=list(node.output), **attrs)
        return

    outside = any(a < -1e-6 or a + bb * (m - 1) > n - 1 + 1e-6 for (a, bb), n, m in zip(wanted, in_shape, out_shape))
    if outside and attrs.get("exclude_outside", 0):
        log.warning("Resize %s: scale-exact coordinates need edge padding, invalid with exclude_outside; "
                    "TVM's size ratio is used instead", node.name)
        b.op("Resize", [x, roi, "", sizes], outputs=list(node.output), **attrs)
        return
    if outside:
        pads = [0, 0] + [_PAD] * (rank - 2)
        x = b.op("Pad", [x, b.const("edge_pads", np.array(pads + pads, np.int64))], mode="edge")
        in_shape = [n + 2 * p for n, p in zip(in_shape, pads)]
        wanted = [(a + p, bb) for (a, bb), p in zip(wanted, pads)]
    attrs["coordinate_transformation_mode"] = "tf_crop_and_resize"
    attrs["extrapolation_value"] = 0.0
    crop_shape = out_shape[:2] + [_crop_len(m, n, w) for m, n, w in zip(out_shape[2:], in_shape[2:], wanted[2:])]
    roi = b.const("roi", np.array(crop_roi(wanted, in_shape, crop_shape), np.float32))
    crop_sizes = b.const("sizes", np.array(crop_shape, np.int64))
    longer = [i for i, (c, m) in enumerate(zip(crop_shape, out_shape)) if c != m]
    if not longer:
        b.op("Resize", [x, roi, "", crop_sizes], outputs=list(node.output), **attrs)
        return
    resized = b.op("Resize", [x, roi, "", crop_sizes], **attrs)
    starts = b.const("starts", np.zeros(len(longer), np.int64))
    ends = b.const("ends", np.array([out_shape[i] for i in longer], np.int64))
    b.op("Slice", [resized, starts, ends, b.const("axes", np.array(longer, np.int64))], outputs=list(node.output))


def _crop_len(out_len: int, in_len: int, affine: tuple[float, float]) -> int:
    """The length to resize an axis to before slicing it back to ``out_len``.

    TVM's ``tf_crop_and_resize`` divides by ``out_len - 1``, so 1 becomes 2; ONNX Runtime
    copies an axis whose size does not change and ignores its roi, so that length is avoided
    unless the map is the identity (keeps the prepared graph a faithful reference).
    """
    if out_len == in_len and math.isclose(affine[0], 0.0, abs_tol=1e-12) and math.isclose(affine[1], 1.0):
        return out_len
    length = max(out_len, 2)
    return length + 1 if length == in_len else length
