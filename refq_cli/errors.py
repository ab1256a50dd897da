"""The error types refq raises for bad input. Plain Python: importing this does not import torch."""


class RefqError(Exception):
    """Base class of every error refq reports to users as one line."""

    exit_code = 2


class QParamsError(RefqError, ValueError):
    """Quantization parameters that are missing, misnamed or impossible."""
