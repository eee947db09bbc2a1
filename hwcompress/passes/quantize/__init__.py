"""INT8 quantization. So far the calibration half: streaming range observers (min/max,
percentile, TensorRT entropy) and the math that turns ranges into scales and zero points.

Importing this package stays light (numpy only).
"""

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
    "EntropyObserver",
    "MinMaxObserver",
    "Observer",
    "PercentileObserver",
    "QParams",
    "asymmetric_qparams",
    "dequantize",
    "kl_threshold",
    "quantize",
    "sqnr_db",
    "symmetric_qparams",
    "weight_qparams",
]
