"""INT8 quantization: streaming range observers (min/max, percentile, TensorRT entropy) and
the math that turns ranges into scales and zero points (``observers``, arrays only), and the
static INT8 technique on Relax graphs with integer kernels (``int8``: ``Int8Static``,
``quantize_int8``, ``int8_report``).

``quantize`` / ``dequantize`` here are the array functions; the graph verb is
``quantize_int8`` (``int8.quantize``). Importing this package stays light (numpy only).
"""

from .dfq import DataFree, apply_dfq
from .int8 import CalibrationMethod, Int8DataFree, Int8Static, int8_report
from .int8 import quantize as quantize_int8
from .observers import (
    EntropyObserver,
    MinMaxObserver,
    Observer,
    PercentileObserver,
    QParams,
    asymmetric_qparams,
    dequantize,
    kl_threshold,
    quantize,
    sqnr_db,
    symmetric_qparams,
    weight_qparams,
)

__all__ = [
    "CalibrationMethod",
    "DataFree",
    "EntropyObserver",
    "Int8DataFree",
    "Int8Static",
    "MinMaxObserver",
    "Observer",
    "PercentileObserver",
    "QParams",
    "apply_dfq",
    "asymmetric_qparams",
    "dequantize",
    "int8_report",
    "kl_threshold",
    "quantize",
    "quantize_int8",
    "sqnr_db",
    "symmetric_qparams",
    "weight_qparams",
]
