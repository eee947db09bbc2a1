"""Static cost analysis of a Relax module: parameters, FLOPs and bytes of memory traffic.

These are the quantities that decide speed besides parallelism and the hardware: FLOPs bound
compute-limited layers, bytes bound memory-limited ones (batch-1 dense, depthwise, 1x1 convs).
Each operator call of ``main`` (before fusion) is one layer:

- ``params``: elements of the constant (weight) arguments;
- ``flops``: 2 x multiply-accumulates for conv/matmul, one per output element (x window size
  for pooling) for everything else;
- ``bytes``: bytes read (all tensor arguments) plus bytes written (the result), i.e. the
  traffic of the layer run on its own with no fusion or cache reuse across layers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Layer:
    name: str
    op: str
    shape: tuple[int, ...]
    params: int
    flops: int
    bytes: int


@dataclass(frozen=True)
class Summary:
    params: int
    flops: int
    bytes: int
    layers: tuple[Layer, ...]

    def to_dict(self) -> dict:
        return {
            "params": self.params,
            "flops": self.flops,
            "bytes": self.bytes,
            "layers": [asdict(layer) | {"shape": list(layer.shape)} for layer in self.layers],
        }


def summarize(mod) -> Summary:
    """Analyze the ``main`` function of a Relax module as imported (before legalization)."""
    from tvm import ir

    layers = []
    for block in mod["main"].body.blocks:
        for binding in block.bindings:
            value = binding.value
            if not isinstance(value, ir.Call) or not isinstance(value.op, ir.Op):
                continue
            layers.append(_layer(binding.var.name, value))
    return Summary(
        params=sum(layer.params for layer in layers),
        flops=sum(layer.flops for layer in layers),
        bytes=sum(layer.bytes for layer in layers),
        layers=tuple(layers),
    )


def _layer(name: str, call) -> Layer:
    from tvm import ir

    op = call.op.name.removeprefix("relax.")
    out_shape, out_bytes = _tensor_facts(call.ty)
    params = 0
    in_bytes = 0
    for arg in call.args:
        shape, nbytes = _tensor_facts(getattr(arg, "ty", None))
        in_bytes += nbytes
        if isinstance(arg, ir.expr.GenericConst) and shape is not None:
            params += math.prod(shape)
    flops = _flops(op, call, out_shape)
    return Layer(name=name, op=op, shape=tuple(out_shape or ()), params=params, flops=flops, bytes=in_bytes + out_bytes)


def static_shape(ty) -> tuple[int, ...] | None:
    """The static shape of a tensor type; None if any dimension is symbolic or the shape unknown."""
    try:
        return tuple(int(d) for d in ty.shape)
    except (TypeError, ValueError, AttributeError):
        return None


def single_use_checker(func):
    """``single_use(var, value)`` for a Relax function: ``var`` is a dataflow variable bound to
    ``value`` that exactly one binding reads. For pattern rewrites, whose matcher looks through
    bindings: fusing ``value`` into its consumer is exact only where nothing else reads it
    (a non-dataflow variable leaves its block, so it counts as read elsewhere)."""
    from tvm import relax

    users, var2val = {}, relax.analysis.get_var2val(func)
    for block in func.body.blocks if isinstance(func.body, relax.SeqExpr) else ():
        if isinstance(block, relax.DataflowBlock):
            users.update(relax.analysis.udchain(block))

    def single_use(var, value) -> bool:
        return isinstance(var, relax.DataflowVar) and var in var2val and var2val[var].same_as(value) and len(users.get(var, ())) == 1

    return single_use


def _tensor_facts(ty) -> tuple[list[int] | None, int]:
    """(shape, bytes) of a tensor type; (None, 0) for non-tensors or unknown shapes."""
    from tvm import relax

    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        if isinstance(ty, relax.TupleType):
            total = sum(_tensor_facts(f)[1] for f in ty.fields)
            return None, total
        return None, 0
    try:
        shape = [int(d) for d in ty.shape.values]
    except (TypeError, AttributeError):
        return None, 0
    bits = _dtype_bits(str(ty.dtype))
    return shape, math.prod(shape) * bits // 8


def _dtype_bits(dtype: str) -> int:
    if dtype == "bool":
        return 8
    digits = "".join(ch for ch in dtype if ch.isdigit())
    return int(digits) if digits else 32


def _flops(op: str, call, out_shape: list[int] | None) -> int:
    if not out_shape:
        return 0
    out_elems = math.prod(out_shape)
    if op in ("nn.conv2d", "nn.conv1d", "nn.conv3d", "nn.conv2d_transpose"):
        weight, _ = _tensor_facts(call.args[1].ty)
        if weight is None:
            return 0
        if op == "nn.conv2d_transpose":
            # weight is (in, out/groups, kh, kw); every input element scatters out/groups*kh*kw MACs
            data, _ = _tensor_facts(call.args[0].ty)
            return 2 * math.prod(data) * math.prod(weight[1:]) if data else 0
        # weight is (out, in/groups, k...): each output element takes in/groups*k... MACs
        return 2 * out_elems * math.prod(weight[1:])
    if op in ("matmul", "nn.dense", "linear"):
        a, _ = _tensor_facts(call.args[0].ty)
        return 2 * out_elems * (a[-1] if a else 0)
    if op in ("nn.max_pool2d", "nn.avg_pool2d", "nn.max_pool1d", "nn.avg_pool1d"):
        window = math.prod(int(k) for k in call.attrs.pool_size)
        return out_elems * window
    if op in ("mean", "sum", "max", "min", "nn.adaptive_avg_pool2d"):
        data, _ = _tensor_facts(call.args[0].ty)
        return math.prod(data) if data else out_elems
    if op in ("reshape", "permute_dims", "flatten", "squeeze", "expand_dims", "strided_slice", "concat", "split"):
        return 0
    return out_elems


def format_table(summary: Summary, max_rows: int | None = None) -> str:
    """A readable per-layer table with totals."""
    rows = [("layer", "op", "output", "params", "MFLOPs", "KiB")]
    layers = summary.layers if max_rows is None else summary.layers[:max_rows]
    for layer in layers:
        rows.append(
            (
                layer.name,
                layer.op,
                "x".join(map(str, layer.shape)),
                f"{layer.params:,}",
                f"{layer.flops / 1e6:.2f}",
                f"{layer.bytes / 1024:.1f}",
            )
        )
    if max_rows is not None and len(summary.layers) > max_rows:
        rows.append(("...", f"{len(summary.layers) - max_rows} more", "", "", "", ""))
    rows.append(("total", "", "", f"{summary.params:,}", f"{summary.flops / 1e6:.2f}", f"{summary.bytes / 1024:.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for i, row in enumerate(rows):
        cells = [c.ljust(w) if j < 3 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
        if i == 0 or i == len(rows) - 2:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
