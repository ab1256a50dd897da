"""refq: reference-quantized recurrent models.

The library's entry points, one per verb (:mod:`refq_cli.pipeline.api`)::

    import refq_cli

    conversion = refq_cli.convert("model.pt", "q.yaml")  # artifact + reports
    art = refq_cli.load_artifact("model.refq.safetensors")
    refq_cli.inspect(...), refq_cli.diff(...), refq_cli.verify(...), refq_cli.batch(...)
    refq_cli.export("model.refq.safetensors", "onnx/")  # one ONNX model per module
    with refq_cli.record_calibration(model, "calib.safetensors"):  # for --calibration
        run_my_pipeline(model)

Importing this package does not import torch; the entry points (and the submodules that need
it: ``refq_cli.quant.numerics``, ``refq_cli.reference``, ...) do, when first used.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
_ENTRY_POINTS = (
    "convert",
    "load_artifact",
    "inspect",
    "diff",
    "verify",
    "batch",
    "export",
    "record_calibration",
)
__all__ = ["__version__", *_ENTRY_POINTS]


def __getattr__(name: str) -> Any:
    if name in _ENTRY_POINTS:
        from refq_cli.pipeline import api

        return getattr(api, name)
    raise AttributeError(f"module 'refq_cli' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_ENTRY_POINTS])
