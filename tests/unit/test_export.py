import json

import pytest

from hwcompress.errors import ArtifactError
from hwcompress.export import read_manifest, staging, write_manifest


def test_staging_is_atomic_on_failure(tmp_path):
    out = tmp_path / "art"
    with pytest.raises(RuntimeError):
        with staging(out) as tmp:
            (tmp / "module.so").write_bytes(b"half")
            raise RuntimeError("build failed")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_staging_replaces_previous_artifact(tmp_path):
    out = tmp_path / "art"
    for content in (b"one", b"two"):
        with staging(out) as tmp:
            (tmp / "module.so").write_bytes(content)
            write_manifest(tmp, {"x": 1})
    assert (out / "module.so").read_bytes() == b"two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_refuses_to_overwrite_foreign_directory(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    with pytest.raises(ArtifactError, match="not an hwc artifact"):
        with staging(out):
            pass
    assert (out / "thesis.tex").read_text() == "precious"


def test_manifest_hashes_are_checked(tmp_path):
    with staging(tmp_path / "art") as tmp:
        (tmp / "module.so").write_bytes(b"code")
        write_manifest(tmp, {})
    manifest = read_manifest(tmp_path / "art")
    assert set(manifest["files"]) == {"module.so"}
    (tmp_path / "art" / "module.so").write_bytes(b"tampered")
    with pytest.raises(ArtifactError, match="module.so does not match its SHA-256"):
        read_manifest(tmp_path / "art")


def test_corrupt_or_missing_manifest(tmp_path):
    with pytest.raises(ArtifactError, match="no such artifact"):
        read_manifest(tmp_path / "none")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="corrupt manifest"):
        read_manifest(tmp_path / "a")
    (tmp_path / "a" / "manifest.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(ArtifactError, match="unsupported artifact format"):
        read_manifest(tmp_path / "a")
