"""Calibration / evaluation data reader: sources, streaming, batch re-cutting, error messages."""

import sys

import numpy as np
import pytest

from hwcompress.data import read_batches
from hwcompress.errors import DataError

IMAGE_INPUT = [("image", (2, 3, 4, 5), "float32")]


def _samples(n, shape=(3, 4, 5), start=0):
    """``n`` samples whose first element counts up from ``start``: order is visible."""
    x = np.zeros((n, *shape), np.float32)
    x[:, 0, 0, 0] = np.arange(start, start + n)
    return x


def _order(batches):
    return [float(v) for b in batches for v in b[0][:, 0, 0, 0]]


def test_directory_of_npy_files_recut_into_model_batches(tmp_path):
    for name, (n, start) in {"b0.npy": (2, 0), "b1.npy": (3, 2), "b2.npy": (1, 5)}.items():
        np.save(tmp_path / name, _samples(n, start=start))
    (tmp_path / "README.txt").write_text("not data")
    batches = list(read_batches(tmp_path, IMAGE_INPUT))
    assert len(batches) == 3 and all(len(b) == 1 and b[0].shape == (2, 3, 4, 5) for b in batches)
    assert _order(batches) == [0, 1, 2, 3, 4, 5]
    assert all(b[0].dtype == np.float32 and b[0].flags.c_contiguous for b in batches)


def test_npz_files_by_input_name(tmp_path):
    inputs = [("a", (1, 4), "float32"), ("b", (1, 2), "int64")]
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((3, 4)), rng.integers(0, 9, (3, 2)).astype(np.int32)
    np.savez(tmp_path / "cal.npz", b=b, a=a, label=np.arange(3))  # labels are ignored
    batches = list(read_batches(tmp_path / "cal.npz", inputs))
    assert len(batches) == 3
    np.testing.assert_array_equal(np.concatenate([x[0] for x in batches]), a.astype(np.float32))
    np.testing.assert_array_equal(np.concatenate([x[1] for x in batches]), b)
    assert batches[0][0].dtype == np.float32 and batches[0][1].dtype == np.int64


def test_iterable_is_streamed_and_not_consumed_past_max_samples():
    pulled = []

    def items():
        for i in range(100):
            if i >= 3:
                raise AssertionError(f"item {i} pulled after max_samples were read")
            pulled.append(i)
            yield _samples(2, start=2 * i)[0] if i == 1 else _samples(2, start=2 * i)  # item 1: one sample, no batch axis

    gen = read_batches(items(), IMAGE_INPUT, max_samples=5)
    assert pulled == []  # nothing read before iteration
    batches = list(gen)
    assert len(batches) == 2 and _order(batches) == [0, 1, 2, 4]
    assert pulled == [0, 1, 2]


def test_directory_read_lazily(tmp_path):
    np.save(tmp_path / "a.npy", _samples(2))
    (tmp_path / "b.npy").write_text("not numpy")  # never reached
    assert len(list(read_batches(tmp_path, IMAGE_INPUT, max_samples=2))) == 1
    with pytest.raises(DataError, match="b.npy"):
        list(read_batches(tmp_path, IMAGE_INPUT))


def test_array_and_mapping_sources():
    x = _samples(5)
    assert _order(read_batches(x, IMAGE_INPUT)) == [0, 1, 2, 3]  # the odd sample out is dropped
    assert _order(read_batches({"image": x, "label": np.arange(5)}, IMAGE_INPUT, max_samples=3)) == [0, 1]


def _error(data, inputs=IMAGE_INPUT) -> str:
    with pytest.raises(DataError) as info:
        list(read_batches(data, inputs))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_shape_errors_name_input_and_file(tmp_path):
    np.save(tmp_path / "good.npy", _samples(2))
    np.save(tmp_path / "wrong.npy", np.zeros((2, 5, 4, 5), np.float32))
    message = _error(tmp_path)
    assert "'image'" in message and "wrong.npy" in message and "[2, 5, 4, 5]" in message and "[3, 4, 5]" in message
    message = _error([_samples(2), np.zeros((2, 3, 4), np.float32)])  # rank 3: not even one sample
    assert "'image'" in message and "item 1" in message and "[2, 3, 4]" in message


def test_dtype_and_missing_input_errors(tmp_path):
    message = _error([_samples(2)], [("image", (2, 3, 4, 5), "int8")])
    assert "'image'" in message and "float32" in message and "int8" in message
    np.savez(tmp_path / "cal.npz", a=np.zeros((2, 4), np.float32))
    message = _error(tmp_path, [("a", (2, 4), "float32"), ("mask", (2, 4), "float32")])
    assert "'mask'" in message and "cal.npz" in message and "has: a" in message
    message = _error([{"a": np.zeros((2, 4)), "mask": np.zeros((4, 4))}], [("a", (2, 4), "float32"), ("mask", (2, 4), "float32")])
    assert "different sample counts" in message and "a: 2" in message and "mask: 4" in message


def test_source_errors(tmp_path):
    assert "not found" in _error(tmp_path / "missing")
    assert "no .npy" in _error(tmp_path)
    assert "fewer than the model's batch of 2" in _error(_samples(1))
    assert "no samples" in _error([])
    assert "2 inputs" in _error([_samples(2)], [("a", (2, 3, 4, 5), "float32"), ("b", (2, 3, 4, 5), "float32")])
    assert "got int" in _error(5)
    assert "got tuple" in _error([(_samples(2),)])
    with pytest.raises(DataError, match="max_samples 1"):
        read_batches(_samples(4), IMAGE_INPUT, max_samples=1)


def test_images_without_pillow_give_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "cat.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    monkeypatch.setitem(sys.modules, "PIL", None)  # as if Pillow were not installed
    with pytest.raises(DataError, match="needs Pillow"):
        read_batches(tmp_path, IMAGE_INPUT)


def test_image_folder(tmp_path):
    image = pytest.importorskip("PIL.Image")
    for i, rgb in enumerate([(255, 0, 0), (0, 0, 255), (0, 255, 0)]):  # solid red, blue, green
        image.new("RGB", (10, 8), rgb).save(tmp_path / f"img{i}.png")
    (batch,) = read_batches(tmp_path, IMAGE_INPUT)  # NCHW float: channels first, scaled to [0, 1]
    assert batch[0].shape == (2, 3, 4, 5) and batch[0].dtype == np.float32
    np.testing.assert_array_equal(batch[0][:, :, 0, 0], [[1, 0, 0], [0, 0, 1]])
    (nhwc,) = read_batches(tmp_path, [("image", (3, 4, 5, 1), "uint8")])  # NHWC grey, raw pixels
    assert nhwc[0].shape == (3, 4, 5, 1) and nhwc[0].dtype == np.uint8
    assert nhwc[0][0, 0, 0, 0] == 76 and nhwc[0][2, 0, 0, 0] == 150  # ITU-R 601 luma of red, green
    (tmp_path / "extra.npy").write_bytes(b"")
    assert "both" in _error(tmp_path)
