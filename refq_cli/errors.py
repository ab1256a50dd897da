"""The error types refq raises for bad input. Plain Python: importing this does not import torch.

Each carries a one-line message saying what is wrong, where, and how to fix it; the CLI prints
that line and exits with ``exit_code``.
"""

from __future__ import annotations


class RefqError(Exception):
    """Base class of every error refq reports to users as one line."""

    exit_code = 2


class QParamsError(RefqError, ValueError):
    """Quantization parameters that are missing, misnamed or impossible.

    ``field`` names the offending parameter (``scale``, ``zero_point``, ...) when there is one.
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class SpecError(RefqError):
    """A spec file that cannot be read or does not fit the model."""


class CheckpointError(RefqError):
    """An input checkpoint that cannot be read, is refused, or holds inconsistent weights."""


class ConversionError(RefqError):
    """A conversion that failed or missed its quality gate."""

    exit_code = 1


class ArtifactError(RefqError):
    """An artifact that cannot be written or read back."""
