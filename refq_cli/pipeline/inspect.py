"""Reading artifacts back without running them: per-weight parameters and diffs.

``describe_artifact`` reads the header and only the small ``_scale`` / ``_zero_point`` tensors,
never the integer codes or float tensors, and imports no torch (:mod:`refq_cli.io.header`).
``diff_artifacts`` compares everything two artifacts hold, every tensor's bytes included, read
block by block with plain file reads, also without torch.
"""

from __future__ import annotations

import fnmatch
import math
import statistics
from itertools import compress
from operator import ne, sub
from pathlib import Path
from typing import Any, BinaryIO

from refq_cli.errors import ArtifactError, shorten
from refq_cli.io.header import (
    TensorEntry,
    decode_values,
    element_bits,
    open_data,
    read_artifact,
    read_block,
    read_values,
)
from refq_cli.kinds import display_path, tensor_key
from refq_cli.pipeline.uptodate import recorded_gate

_QUANTIZED_SUFFIXES = ("_scale", "_zero_point")
_FLOAT32_MAX = 3.4028234663852886e38  # 1/scale must be a float32 too


def _check_params(path: Path, key: str, scale: list, zero_point: list, w: dict[str, Any]) -> None:
    """Refuse what ``load_artifact`` refuses too: a file inspect shows is one refq can run."""
    if not all(math.isfinite(s) and s > 0 and 1 / s <= _FLOAT32_MAX for s in scale):
        raise ArtifactError(
            f"{path}: corrupt artifact: {shorten(key + '_scale')} holds a value that is not "
            "positive and finite"
        )
    if not all(w["quant_min"] <= z <= w["quant_max"] for z in zero_point):
        raise ArtifactError(
            f"{path}: corrupt artifact: {shorten(key + '_zero_point')} holds a value outside "
            f"{w['quant_min']}..{w['quant_max']}"
        )


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
            if w["qscheme"] == "none":  # kept float: listed with the float tensors
                continue
            key = tensor_key(module_path, weight_name)
            owned.update(key + s for s in ("", *_QUANTIZED_SUFFIXES))
            if not (
                fnmatch.fnmatchcase(display_path(module_path), module)
                and fnmatch.fnmatchcase(weight_name, weight)
            ):
                continue
            scale, zero_point = (
                read_values(path, key + s, tensors[key + s]) for s in _QUANTIZED_SUFFIXES
            )
            _check_params(path, key, scale, zero_point, w)
            row = {
                "module": display_path(module_path),
                "module_type": info["float_type"],
                "weight": weight_name,
                "shape": tensors[key].shape,
                "dtype": w["dtype"],
                "qscheme": w.get("spec_qscheme", w["qscheme"]),  # as the spec said it
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
    # As stored: in the file's order, which is the checkpoint's (modules as converted, then
    # every other tensor); the metadata's JSON keys are sorted, so they cannot tell it.
    weights.sort(key=lambda w: tensors[tensor_key(w["module"], w["weight"])].start)
    floats = sorted((n for n in tensors if n not in owned), key=lambda n: tensors[n].start)
    return {
        "path": str(path),
        "source": metadata["refq.source"],
        "producer": metadata["refq.producer"],
        "gate": recorded_gate(metadata),  # the gate it was converted with, and its verdict
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


DIFF_BLOCK_BYTES = 4 << 20  # read from each file at a time when comparing tensors
_CHUNK_BYTES = 64 << 10  # compared number by number when a block differs


def diff_artifacts(
    a: str | Path, b: str | Path, *, module: str = "*", weight: str = "*"
) -> list[dict[str, Any]]:
    """Every difference between two artifacts: metadata (source, spec, producer, ...), module
    sets and their configs and weights' parameters, and every tensor's dtype, shape and bytes
    (codes, scales, zero points and float tensors alike). Filters (globs) narrow it to modules
    and weights, and then leave out the artifact-wide metadata. Tensors are read in blocks of
    :data:`DIFF_BLOCK_BYTES`, whatever their size."""
    a, b = Path(a), Path(b)
    (layout_a, meta_a), (layout_b, meta_b) = read_artifact(a), read_artifact(b)
    changes: list[dict[str, Any]] = []
    if module == "*" and weight == "*":
        for key in _union(meta_a, meta_b):
            if key != "refq.modules":
                section = key.removeprefix("refq.")
                changes += _field_changes(
                    {"section": section}, meta_a.get(key, _ABSENT), meta_b.get(key, _ABSENT)
                )
    modules_a, modules_b = meta_a["refq.modules"], meta_b["refq.modules"]
    for path in _union(modules_a, modules_b):
        if not fnmatch.fnmatchcase(display_path(path), module):
            continue
        where = {"section": "modules", "module": display_path(path)}
        if path not in modules_a or path not in modules_b:
            info = modules_a.get(path) or modules_b[path]
            change = "removed" if path in modules_a else "added"
            changes.append({**where, "change": change, "type": info["float_type"]})
            continue
        for c in _field_changes(where, modules_a[path], modules_b[path]):
            names = c["field"].split(".")
            if names[0] != "weights" or fnmatch.fnmatchcase(".".join(names[1:2]), weight):
                changes.append(c)
    roles = _roles(modules_a) | _roles(modules_b)
    modules = set(modules_a) | set(modules_b)
    tensors_a, tensors_b = layout_a.tensors, layout_b.tensors
    with open_data(a) as file_a, open_data(b) as file_b:
        for name in _union(tensors_a, tensors_b):
            if not _tensor_matches(name, modules, module, weight):
                continue
            where = {"section": "tensors", "tensor": name}
            x, y = tensors_a.get(name), tensors_b.get(name)
            if x is None or y is None:
                t = x or y
                change = "removed" if y is None else "added"
                changes.append({**where, "change": change, "dtype": t.dtype, "shape": t.shape})
                continue
            if x.dtype != y.dtype or x.shape != y.shape:
                for field in ("dtype", "shape"):
                    before, after = getattr(x, field), getattr(y, field)
                    if before != after:
                        changes.append(
                            {
                                **where,
                                "change": "changed",
                                "field": field,
                                "before": before,
                                "after": after,
                            }
                        )
                continue
            differ, worst = _compare_tensor(name, x, y, (a, file_a), (b, file_b))
            if differ:
                changes.append(
                    {
                        **where,
                        "change": "values",
                        "role": roles.get(name, "values"),
                        "dtype": x.dtype,
                        "differ": differ,
                        "of": math.prod(x.shape),
                        "max_abs_diff": worst,
                    }
                )
    return changes


_ABSENT = object()


def _union(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The keys of ``a`` in order, then those only ``b`` has."""
    return [*a, *(k for k in b if k not in a)]


def _field_changes(where: dict[str, Any], a: Any, b: Any) -> list[dict[str, Any]]:
    """The leaves of two JSON values that differ, by dotted path (``rules[0].dtype``)."""
    (flat_a, filled_a), (flat_b, filled_b) = _flatten(a), _flatten(b)
    changes = []
    for path in [*flat_a, *(p for p in flat_b if p not in flat_a)]:
        x, y = flat_a.get(path, _ABSENT), flat_b.get(path, _ABSENT)
        if type(x) is type(y) and x == y:  # types too: true is not 1, 1 is not 1.0
            continue
        if path in (filled_b if y is _ABSENT else filled_a if x is _ABSENT else ()):
            continue  # {} against a filled object: its leaves tell
        change = "removed" if y is _ABSENT else "added" if x is _ABSENT else "changed"
        c = {**where, "field": _path_text(path), "change": change}
        if x is not _ABSENT:
            c["before"] = x
        if y is not _ABSENT:
            c["after"] = y
        changes.append(c)
    return changes


_FieldPath = tuple[str | int, ...]


def _flatten(value: Any) -> tuple[dict[_FieldPath, Any], set[_FieldPath]]:
    """Path -> leaf (a scalar, or an empty object or list), in order, and the paths of the
    objects and lists that are not empty; without recursion, as metadata may nest as deep as
    the JSON parser allows."""
    flat: dict[_FieldPath, Any] = {}
    filled: set[_FieldPath] = set()
    stack: list[tuple[_FieldPath, Any]] = [] if value is _ABSENT else [((), value)]
    while stack:
        path, v = stack.pop()
        items = list(
            v.items() if isinstance(v, dict) else enumerate(v) if isinstance(v, list) else ()
        )
        if items:
            filled.add(path)
            stack += [((*path, k), child) for k, child in reversed(items)]
        else:
            flat[path] = v
    return flat, filled


def _path_text(path: _FieldPath) -> str:
    text = ""
    for p in path:
        text += f"[{p}]" if isinstance(p, int) else f".{p}" if text else p
    return text


def _roles(modules: dict[str, Any]) -> dict[str, str]:
    """Tensor name -> codes, scales or zero_points, for the quantized weights."""
    roles = {}
    for module_path, info in modules.items():
        for weight_name, w in info["weights"].items():
            if w["qscheme"] != "none":
                key = tensor_key(module_path, weight_name)
                roles |= {
                    key: "codes",
                    key + "_scale": "scales",
                    key + "_zero_point": "zero_points",
                }
    return roles


def _tensor_matches(name: str, modules: set[str], module: str, weight: str) -> bool:
    """Whether the globs match the tensor's module (the longest module path it starts with, or
    what precedes its last dot) and its local name (with or without _scale or _zero_point)."""
    if module == "*" and weight == "*":
        return True
    owners = [m for m in modules if name.startswith(m + ".") or not m]
    owner = max(owners, key=len) if owners else name.rpartition(".")[0]
    local = name[len(owner) + 1 :] if owner else name
    stems = [local] + [local.removesuffix(s) for s in _QUANTIZED_SUFFIXES if local.endswith(s)]
    return fnmatch.fnmatchcase(display_path(owner), module) and any(
        fnmatch.fnmatchcase(s, weight) for s in stems
    )


def _compare_tensor(
    name: str, x: TensorEntry, y: TensorEntry, a: tuple[Path, BinaryIO], b: tuple[Path, BinaryIO]
) -> tuple[int, float]:
    """How many elements of two tensors of one dtype and shape differ bit for bit, and the
    largest absolute difference among them (NaN if one of them is NaN)."""
    size, differ = x.end - x.start, 0
    worst: float = 0.0 if x.dtype.startswith(("F", "BF")) else 0
    for offset in range(0, size, DIFF_BLOCK_BYTES):
        n = min(DIFF_BLOCK_BYTES, size - offset)
        block_a = read_block(a[1], a[0], name, x.start + offset, n)
        block_b = read_block(b[1], b[0], name, y.start + offset, n)
        if block_a == block_b:
            continue
        for at in range(0, n, _CHUNK_BYTES):
            chunk_a, chunk_b = block_a[at : at + _CHUNK_BYTES], block_b[at : at + _CHUNK_BYTES]
            if chunk_a == chunk_b:
                continue
            mask = list(map(ne, element_bits(x.dtype, chunk_a), element_bits(x.dtype, chunk_b)))
            values_a, values_b = decode_values(x.dtype, chunk_a), decode_values(x.dtype, chunk_b)
            deltas = list(map(abs, map(sub, compress(values_a, mask), compress(values_b, mask))))
            differ += len(deltas)
            if worst != worst:
                continue  # NaN already: it stays
            if isinstance(worst, float) and any(map(math.isnan, deltas)):
                worst = math.nan
            else:
                worst = max(worst, *deltas)
    return differ, worst
