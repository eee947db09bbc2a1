"""Calibration and evaluation data readers: one place that turns what a user gives (a directory
of ``.npy`` / ``.npz`` files or images, an array, ``{input name: array}``, or an iterable of
arrays / mappings) into batches shaped exactly like the model's inputs.

Items are read and checked one at a time and re-cut into the model's batch size as they come,
so a large directory or a generator is streamed, never held whole, and reading stops as soon
as ``max_samples`` are out. A sample that does not fit raises ``DataError`` naming the input
and the file (or item) it came from.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .errors import DataError
from .runtime import load_array_file

__all__ = ["InputSpec", "read_batches"]

log = logging.getLogger("hwcompress")

ARRAY_SUFFIXES = (".npy", ".npz")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class InputSpec(NamedTuple):
    """One model input: name, static shape (batch first) and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: str


def read_batches(data, inputs: Sequence[tuple[str, Sequence[int], str]], max_samples: int | None = None) -> Iterator[list[np.ndarray]]:
    """Batches of the model's inputs, in input order, read from ``data`` as they are needed.

    Parameters
    ----------
    data : path, ndarray, mapping or iterable
        A directory (``.npy`` files of samples for a one-input model, ``.npz`` files keyed by
        input name, or PNG/JPEG images for a one-image-input model; read in name order), one
        such file, an array of samples, ``{input name: samples}``, or an iterable of arrays /
        mappings (consumed lazily). Samples run along axis 0; an item may also be one sample
        without that axis. Arrays under other names (labels) are ignored.
    inputs : sequence of (name, shape, dtype)
        The model's inputs; every input is batched along axis 0 with the same batch size.
    max_samples : int or None
        Read no more samples than this (rounded down to whole batches); None: all.

    Returns
    -------
    iterator of list of ndarray
        Each batch exactly the model's shapes and dtypes. Samples past the last whole batch
        are dropped. Images are resized to the input's height and width, and scaled to
        ``[0, 1]`` for float inputs; normalisation beyond that is the caller's.

    Raises
    ------
    DataError
        Data that cannot be read or does not fit an input; where this can be known before
        reading (a missing path, an unusable ``max_samples``) it is raised at the call,
        otherwise when the offending item is reached.
    """
    specs = [InputSpec(str(n), tuple(int(d) for d in s), str(np.dtype(t))) for n, s, t in inputs]
    batch = _batch_size(specs)
    if max_samples is not None and max_samples < batch:
        raise DataError(f"calibration: max_samples {max_samples} is smaller than the model's batch of {batch}")
    return _rebatch(_items(data, specs), specs, batch, max_samples)


def _batch_size(specs: list[InputSpec]) -> int:
    """The batch size all inputs share: the reader cuts every input along axis 0 together."""
    if not specs:
        raise DataError("calibration: the model has no inputs")
    batch = specs[0].shape[0] if specs[0].shape else 0
    for spec in specs:
        if not spec.shape or spec.shape[0] != batch or batch < 1:
            raise DataError(f"calibration needs every input batched along axis 0 with one batch size; input {spec.name!r} has shape {list(spec.shape)}")
    return batch


def _rebatch(items: Iterator[tuple[str, object]], specs: list[InputSpec], batch: int, max_samples: int | None) -> Iterator[list[np.ndarray]]:
    """Cut checked items into batches of ``batch`` samples; stop pulling items at the limit."""
    limit = None if max_samples is None else max_samples // batch * batch
    pending: list[list[np.ndarray]] = []
    have = done = 0
    for where, item in items:
        arrays = _check(item, where, specs)
        take = arrays[0].shape[0] if limit is None else min(arrays[0].shape[0], limit - done - have)
        pending.append([a[:take] for a in arrays])
        have += take
        if have < batch:
            continue
        joined = [np.concatenate(parts) for parts in zip(*pending)] if len(pending) > 1 else pending[0]
        count = have // batch
        for b in range(count):
            yield [np.ascontiguousarray(a[b * batch : (b + 1) * batch]) for a in joined]
        done += count * batch
        have -= count * batch
        pending = [[a[count * batch :] for a in joined]] if have else []
        if limit is not None and done >= limit:
            return
    if not done:
        raise DataError(f"calibration data: {have} samples, fewer than the model's batch of {batch}" if have else "calibration data has no samples")
    if have:
        log.info("calibration: %d samples past the last whole batch of %d are not used", have, batch)


def _check(item, where: str, specs: list[InputSpec]) -> list[np.ndarray]:
    """One item as arrays in input order, each cast to its input's dtype."""
    named = _named(item, where, specs)
    arrays = []
    for spec in specs:
        if spec.name not in named:
            raise DataError(f"calibration data in {where} has no input {spec.name!r} (has: {', '.join(sorted(named)) or 'nothing'})")
        arrays.append(_fit(named[spec.name], where, spec))
    counts = {spec.name: a.shape[0] for spec, a in zip(specs, arrays)}
    if len(set(counts.values())) > 1:
        raise DataError(f"calibration data in {where}: inputs have different sample counts ({', '.join(f'{k}: {v}' for k, v in counts.items())})")
    return arrays


def _named(item, where: str, specs: list[InputSpec]) -> dict[str, np.ndarray]:
    if isinstance(item, Mapping):
        return {str(k): np.asarray(v) for k, v in item.items()}
    if isinstance(item, np.ndarray):
        if len(specs) != 1:
            names = ", ".join(s.name for s in specs)
            raise DataError(f"calibration data in {where}: the model has {len(specs)} inputs ({names}); give {{input name: samples}} mappings (.npz files)")
        return {specs[0].name: item}
    raise DataError(f"calibration data in {where}: expected an array or a mapping of input name to array, got {type(item).__name__}")


def _fit(arr: np.ndarray, where: str, spec: InputSpec) -> np.ndarray:
    given = arr.shape
    if arr.ndim == len(spec.shape) - 1:  # one sample without the batch axis
        arr = arr[None]
    if arr.shape[1:] != spec.shape[1:] or arr.ndim != len(spec.shape):
        raise DataError(f"calibration input {spec.name!r} in {where}: shape {list(given)} does not fit the model's {list(spec.shape)} (samples along axis 0, each {list(spec.shape[1:])})")
    if not np.can_cast(arr.dtype, spec.dtype, "same_kind"):
        raise DataError(f"calibration input {spec.name!r} in {where}: dtype {arr.dtype}, the model takes {spec.dtype}")
    return arr.astype(spec.dtype, copy=False)


# ---------------------------------------------------------------------------- sources


def _items(data, specs: list[InputSpec]) -> Iterator[tuple[str, object]]:
    """``(where, item)`` pairs of any accepted source; paths are checked now, read later."""
    if isinstance(data, (str, os.PathLike)):
        return _path_items(Path(data), specs)
    if isinstance(data, np.ndarray):
        return iter([("the array", data)])
    if isinstance(data, Mapping):
        return iter([("the mapping", data)])
    if isinstance(data, Iterable) and not isinstance(data, bytes):
        return ((f"item {i}", item) for i, item in enumerate(data))
    raise DataError(f"calibration data must be a directory, a file, an array, a mapping or an iterable of batches, got {type(data).__name__}")


def _path_items(path: Path, specs: list[InputSpec]) -> Iterator[tuple[str, object]]:
    if not path.exists():
        raise DataError(f"calibration data not found: {path}")
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    arrays = [p for p in files if p.suffix.lower() in ARRAY_SUFFIXES]
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    if arrays and images:
        raise DataError(f"{path}: holds both array files and images; keep one kind per directory")
    if images:
        return _image_items(images, specs)
    if not arrays:
        raise DataError(f"{path}: no .npy, .npz or image (PNG/JPEG) files")
    return ((str(p), load_array_file(p)) for p in arrays)


def _image_items(paths: list[Path], specs: list[InputSpec]) -> Iterator[tuple[str, object]]:
    image = _pillow(paths[0])
    nchw = _image_layout(specs, paths[0])
    return ((str(p), _read_image(image, p, specs[0], nchw)) for p in paths)


def _pillow(path: Path):
    """Pillow's ``Image`` module: an optional dependency, needed only for image folders."""
    try:
        from PIL import Image
    except ImportError:
        raise DataError(f"{path}: reading images needs Pillow (pip install pillow); or give the samples as .npy files") from None
    return Image


def _image_layout(specs: list[InputSpec], path: Path) -> bool:
    """True for NCHW, False for NHWC, from which axis holds 1 or 3 channels."""
    spec = specs[0]
    if len(specs) == 1 and len(spec.shape) == 4:
        if spec.shape[1] in (1, 3):
            return True
        if spec.shape[3] in (1, 3):
            return False
    raise DataError(f"{path}: images need a model with one image input (N, C, H, W) or (N, H, W, C) of 1 or 3 channels; input {spec.name!r} is {list(spec.shape)}")


def _read_image(image, path: Path, spec: InputSpec, nchw: bool) -> np.ndarray:
    """One image as one sample of ``spec``: RGB or grey, resized, in the input's layout."""
    channels, height, width = (spec.shape[1], spec.shape[2], spec.shape[3]) if nchw else (spec.shape[3], spec.shape[1], spec.shape[2])
    try:
        with image.open(path) as img:
            pixels = np.asarray(img.convert("RGB" if channels == 3 else "L").resize((width, height), image.Resampling.BILINEAR))
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable image ({e})") from None
    pixels = pixels.reshape(height, width, channels)
    if nchw:
        pixels = pixels.transpose(2, 0, 1)
    if np.issubdtype(np.dtype(spec.dtype), np.floating):
        pixels = pixels.astype(spec.dtype) / 255
    return pixels[None]
