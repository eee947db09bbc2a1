"""User-facing errors.

Every error a user can cause (bad model, unsupported op, bad target file, bad data) is an
``HwcError`` whose message names the culprit (file, node, field or input). The CLI prints the
message on one line and exits with code 2.
"""

from __future__ import annotations


class HwcError(Exception):
    """Base class of every error caused by the user's input."""

    exit_code = 2


class ModelError(HwcError):
    """The model file cannot be read or is not a valid ONNX model."""


class UnsupportedOpError(ModelError):
    """The model uses operators hwcompress cannot import."""


class ShapeError(ModelError):
    """An input shape is dynamic, or a given shape does not fit the model."""


class TargetError(HwcError):
    """A target name is unknown or a target file is malformed."""


class RecipeError(HwcError):
    """A recipe or technique config is malformed."""


class DataError(HwcError):
    """Input data (npy/npz files, arrays) does not fit the model."""


class ArtifactError(HwcError):
    """An artifact is missing, corrupt, or cannot run on this machine."""


class VerificationError(HwcError):
    """The built module does not match the reference within tolerance."""


class BuildError(HwcError):
    """A compiler stage failed; the message names the stage and what failed in it."""
