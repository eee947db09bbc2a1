"""Graph passes on the imported Relax module, each a recipe technique.

* ``fold-bn``: ``fold_bn(mod, FoldBatchNorm())`` folds inference BatchNorm into the preceding
  conv / matmul weights and bias.
* ``fuse``: ``fuse(mod, Fuse())`` groups conv / matmul + bias (+ residual add) + activation
  into one kernel; ``build.legalize(mod, spec, fuse=False)`` switches TVM's own fusion off.
* ``winograd``: ``winograd(mod, Winograd())`` rewrites eligible 3x3 stride-1 convs into
  Winograd F(2x2,3x3) / F(4x4,3x3) kernels with the weights transformed at compile time.
* ``prune``: ``prune(mod, ChannelPrune(ratio=0.4, criterion="l1"))`` removes whole channels
  (dependency groups through residual adds, concats and depthwise convs), reducing the weight
  shapes; ``criterion="reconstruct"`` refits the next layers on calibration data.
* ``layout``: ``convert_layout(mod, ConvLayout("NHWC"))`` runs the convs (and the ops between
  them) in NHWC or blocked NCHW{b}c; transposes remain only at the graph's edges.
* ``int8``: ``quantize_int8(mod, Int8Static(data=calib))`` runs the convs and matmuls on uint8
  activations x int8 weights with int32 sums, calibrated on data (``quantize.int8``);
  ``int8-data-free``: ``Int8DataFree()``, the same without data (DFQ weight steps, activation
  ranges from synthetic inputs).
* ``sparse-2-4``: ``sparsify(mod, Sparse24(permute=True))`` prunes conv / matmul weights to
  2:4 along the reduction axis; the backends run them on sparse kernels that read only the
  kept values and their positions (``sparsity``).

Importing this package stays light (numpy only): TVM is imported when a pass runs.
"""

from ..recipe import register_technique
from .fold_bn import FoldBatchNorm, fold_bn
from .fuse import Fuse, fuse
from .layout import ConvLayout, convert_layout
from .prune import ChannelPrune, prune
from .quantize.int8 import Int8DataFree, Int8Static
from .quantize.int8 import quantize as quantize_int8
from .sparsity import Sparse24, sparsify
from .winograd import Winograd, winograd

__all__ = [
    "ChannelPrune", "ConvLayout", "FoldBatchNorm", "Fuse", "Int8DataFree", "Int8Static", "Sparse24", "Winograd",
    "convert_layout", "fold_bn", "fuse", "prune", "quantize_int8", "sparsify", "winograd",
]  # fmt: skip

register_technique("fold-bn", FoldBatchNorm, lambda mod, cfg, spec: fold_bn(mod, cfg))
register_technique("fuse", Fuse, lambda mod, cfg, spec: fuse(mod, cfg, spec))
register_technique("winograd", Winograd, lambda mod, cfg, spec: winograd(mod, cfg, spec))
register_technique("prune", ChannelPrune, lambda mod, cfg, spec: prune(mod, cfg, spec), exact=False)
register_technique("layout", ConvLayout, lambda mod, cfg, spec: convert_layout(mod, cfg))
register_technique("int8", Int8Static, lambda mod, cfg, spec: quantize_int8(mod, cfg, spec), exact=False)
register_technique("int8-data-free", Int8DataFree, lambda mod, cfg, spec: quantize_int8(mod, cfg, spec), exact=False)
register_technique("sparse-2-4", Sparse24, lambda mod, cfg, spec: sparsify(mod, cfg, spec), exact=False)
