"""Reading artifacts back without running them: per-weight parameters and diffs.

``describe_artifact`` reads the header and only the small ``_scale`` / ``_zero_point`` tensors,
never the integer codes or float tensors, and imports no torch (:mod:`refq_cli.header`).
"""

from __future__ import annotations

import fnmatch
import statistics
from pathlib import Path
from typing import Any

from refq_cli.header import read_artifact, read_values

_QUANTIZED_SUFFIXES = ("_scale", "_zero_point")


def _summary(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def describe_artifact(
    path: str | Path, *, module: str = "*", weight: str = "*", channels: bool = False
) -> dict[str, Any]:
    """Everything ``refq inspect`` shows, as plain data; filters are globs."""
    path = Path(path)
    layout, metadata = read_artifact(path)
    tensors, modules = layout.tensors, metadata["refq.modules"]
    weights = []
    owned = set()
    for module_path, info in modules.items():
        for weight_name, w in info["weights"].items():
            key = f"{module_path}.{weight_name}" if module_path else weight_name
            owned.add(key)
            if w["qscheme"] == "none":
                continue
            owned.update(key + s for s in _QUANTIZED_SUFFIXES)
            if not (
                fnmatch.fnmatchcase(module_path, module)
                and fnmatch.fnmatchcase(weight_name, weight)
            ):
                continue
            scale, zero_point = (
                read_values(path, key + s, tensors[key + s]) for s in _QUANTIZED_SUFFIXES
            )
            row = {
                "module": module_path,
                "module_type": info["float_type"],
                "weight": weight_name,
                "shape": tensors[key].shape,
                "dtype": w["dtype"],
                "qscheme": w["qscheme"],
                "axis": w["axis"],
                "quant_min": w["quant_min"],
                "quant_max": w["quant_max"],
                "sqnr_db": w.get("sqnr_db"),
                "scale": _summary(scale),
                "zero_point": _summary(zero_point),
            }
            if channels:
                row["scales"], row["zero_points"] = scale, zero_point
            weights.append(row)
    floats = sorted(n for n in tensors if n not in owned)
    return {
        "path": str(path),
        "source": metadata["refq.source"],
        "producer": metadata["refq.producer"],
        "format_version": int(metadata["refq.format_version"]),
        "totals": {
            "modules": len(modules),
            "quantized_weights": sum(
                w["qscheme"] != "none" for m in modules.values() for w in m["weights"].values()
            ),
            "float_tensors": len(floats),
            "tensor_bytes": sum(t.end - t.start for t in tensors.values()),
            "file_bytes": path.stat().st_size,
        },
        "weights": weights,
        "float_tensors": [
            {"name": n, "shape": tensors[n].shape, "dtype": tensors[n].dtype} for n in floats
        ],
    }


def diff_artifacts(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    """Weight-by-weight differences between two ``describe_artifact(..., channels=True)``."""

    def index(desc: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
        return {(w["module"], w["weight"]): w for w in desc["weights"]}

    left, right = index(a), index(b)
    changes = []
    for key in sorted(set(left) | set(right)):
        name = ".".join(p for p in key if p)
        if key not in right:
            changes.append({"weight": name, "change": "removed"})
        elif key not in left:
            changes.append({"weight": name, "change": "added"})
        else:
            x, y = left[key], right[key]
            for field in (
                "shape",
                "dtype",
                "qscheme",
                "axis",
                "quant_min",
                "quant_max",
                "scales",
                "zero_points",
                "sqnr_db",
            ):
                if x.get(field) != y.get(field):
                    changes.append(
                        {
                            "weight": name,
                            "change": f"{field} changed",
                            "before": _brief(x.get(field)),
                            "after": _brief(y.get(field)),
                        }
                    )
    return changes


def _brief(value: Any) -> Any:
    if isinstance(value, list) and len(value) > 4:
        return _summary(value)
    return value
