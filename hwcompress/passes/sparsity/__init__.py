"""2:4 structured sparsity: the numpy math (``mask24``: masks, the compressed form, the
input-channel permutation search) and the graph technique (``sparse24``: ``Sparse24``,
``sparsify``, ``sparsity_report``). Importing this package stays light (numpy only)."""

from .mask24 import Compressed, compress, decompress, is_2to4, kept_fraction, mask_2to4, permutation_search
from .sparse24 import Decide, Sparse24, sparsify, sparsity_report

__all__ = [
    "Compressed", "Decide", "Sparse24", "compress", "decompress", "is_2to4", "kept_fraction", "mask_2to4",
    "permutation_search", "sparsify", "sparsity_report",
]  # fmt: skip
