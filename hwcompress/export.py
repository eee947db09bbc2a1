"""Writing and reading artifact directories.

An artifact is a directory written atomically: everything goes into a hidden staging
directory beside the destination, ``manifest.json`` (with the SHA-256 of every other file)
is written last, and the staging directory is renamed into place. A failed build removes
the staging directory, so no half-written artifact is ever left behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .errors import ArtifactError

MANIFEST = "manifest.json"
MODULE = "module.so"
FORMAT_VERSION = 1


@contextlib.contextmanager
def staging(out: str | os.PathLike):
    """Yield a fresh staging directory; on normal exit it replaces ``out`` atomically."""
    out = check_destination(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    try:
        yield tmp
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_destination(out: str | os.PathLike) -> Path:
    """``out`` as an absolute path, if an artifact may be written there: it does not exist, is
    an empty directory, or holds an earlier artifact (which is then replaced)."""
    out = Path(out).resolve()
    if out.exists() and not out.is_dir():
        raise ArtifactError(f"{out}: exists and is not a directory; refusing to overwrite it")
    if out.is_dir() and not (out / MANIFEST).is_file() and any(out.iterdir()):
        raise ArtifactError(f"{out}: exists and is not an hwc artifact; refusing to overwrite it")
    return out


def _swap_into_place(tmp: Path, out: Path) -> None:
    if not out.exists():
        tmp.rename(out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    old.rmdir()
    out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Hash every file in ``directory`` and write ``manifest.json`` (last)."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = dict(manifest)
    manifest["format_version"] = FORMAT_VERSION
    manifest["files"] = {str(p.relative_to(directory)): sha256(p) for p in files}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return manifest


def read_manifest(directory: str | os.PathLike, check_hashes: bool = True) -> dict[str, Any]:
    """Read and check an artifact's manifest; ``ArtifactError`` names what is wrong."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise ArtifactError(f"{directory}: no such artifact directory")
    if not path.is_file():
        raise ArtifactError(f"{directory}: not an hwc artifact (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: corrupt manifest: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path}: unsupported artifact format {manifest.get('format_version')!r}")
    if check_hashes:
        for rel, expected in manifest.get("files", {}).items():
            file = directory / rel
            if not file.is_file():
                raise ArtifactError(f"{directory}: file {rel} listed in the manifest is missing")
            if sha256(file) != expected:
                raise ArtifactError(f"{directory}: {rel} does not match its SHA-256 in the manifest (modified or corrupt)")
    return manifest
