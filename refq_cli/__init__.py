"""refq: reference-quantized recurrent models.

Importing this package does not import torch; the submodules that need it
(`refq_cli.quant.numerics`, `refq_cli.reference`, ...) do, and so does `refq_cli.load_artifact`.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "load_artifact"]


def __getattr__(name: str) -> Any:
    if name == "load_artifact":
        from refq_cli.pipeline.artifact import load_artifact

        return load_artifact
    raise AttributeError(f"module 'refq_cli' has no attribute {name!r}")
