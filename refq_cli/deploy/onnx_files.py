"""ONNX files of an artifact's modules: one model per module, checked for its target, written
together through :class:`refq_cli.io.outputs.Outputs` (all of them or none).

A module's file is named after it, ``encoder.lstm.onnx`` (``root.onnx`` for the module at the
root), in the output folder.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from refq_cli.deploy import DEFAULT_OPSET
from refq_cli.deploy.onnx_graph import module_model
from refq_cli.errors import ExportError, argument, plural
from refq_cli.io.outputs import Outputs, check_outputs, starts_with
from refq_cli.kinds import ROOT

TARGETS = ("onnxruntime", "tensorrt")
# What TensorRT's explicit quantization takes: signed weights, zero points of 0.
_TENSORRT_DTYPES = ("qint8", "int4")
_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")
# How a model refq wrote begins: ir_version (field 1, one byte), then producer_name "refq".
_REFQ_MODEL = re.compile(rb"\x08[\x00-\x7f]\x12\x04refq")
_REPLACEABLE = {"out_dir": starts_with(_REFQ_MODEL)}


@dataclass(frozen=True)
class ExportedModel:
    """One module's ONNX file: where it is, and the graph's inputs and outputs."""

    module: str
    path: Path
    bytes: int
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


def export_modules(
    modules: Mapping[str, nn.Module],
    out_dir: Path,
    *,
    source: Path,
    module: str = "*",
    opset: int = DEFAULT_OPSET,
    initial_states: bool = True,
    target: str | None = None,
    force: bool = False,
) -> list[ExportedModel]:
    """Write an ONNX model of each of ``modules`` (refq's names, ``<root>`` for the root)
    matching the glob ``module`` into ``out_dir``; ``source`` is the artifact they were read
    from, which no output may be. Every check comes before any file is written."""
    chosen = {n: m for n, m in modules.items() if fnmatch.fnmatchcase(n, module)}
    if not chosen:
        raise ExportError(
            f"{argument('module', module)}: matches no module of {source}; it has "
            + ", ".join(modules)
        )
    if target is not None:
        check_target(chosen, target)
    paths = {name: out_dir / f"{file_stem(name, source)}.onnx" for name in chosen}
    files, inputs = [("out_dir", p) for p in paths.values()], {"artifact": source}
    check_outputs(files, inputs, force=force, replaceable=_REPLACEABLE)
    models = {  # before any folder is made: a module that cannot be exported leaves none
        name: module_model(m, opset=opset, initial_states=initial_states, name=name)
        for name, m in chosen.items()
    }
    exported = []
    with Outputs(files, inputs, force=force, replaceable=_REPLACEABLE) as outputs:
        for name, model in models.items():
            content = model.SerializeToString()
            outputs.write(paths[name], content)
            exported.append(
                ExportedModel(
                    module=name,
                    path=paths[name],
                    bytes=len(content),
                    inputs=tuple(i.name for i in model.graph.input),
                    outputs=tuple(o.name for o in model.graph.output),
                )
            )
        outputs.commit()
    return exported


def file_stem(name: str, source: Path) -> str:
    """The file name (without ``.onnx``) of module ``name``; an artifact is a file from
    anywhere, so a name that could point outside the folder is refused."""
    if name == ROOT:
        return "root"
    if not _FILE_NAME.fullmatch(name) or ".." in name:
        raise ExportError(
            f"{source}: module {name!r} cannot name a file (only letters, digits, _, . and -); "
            "this artifact was not written by refq convert"
        )
    return name


def check_target(modules: Mapping[str, nn.Module], target: str) -> None:
    """Refuse what ``target`` cannot run, naming the first weight and the spec that fits."""
    if target not in TARGETS:
        raise ExportError(f"{argument('target', target)}: use one of {', '.join(TARGETS)}")
    if target != "tensorrt":
        return
    refused = []
    for name, m in modules.items():
        for weight in m._quantized_names:  # type: ignore[union-attr]
            qp = m.weight_qparams(weight)  # type: ignore[operator]
            if qp.dtype not in _TENSORRT_DTYPES or bool((qp.zero_point != 0).any()):
                refused.append((f"{name}.{weight}", qp))
    if refused:
        where, qp = refused[0]
        raise ExportError(
            f"{argument('target', target)}: TensorRT takes int8 or int4 weights with zero "
            f"points of 0; {where} is {qp.dtype} {qp.qscheme} with zero point "
            f"{_zero_points(qp.zero_point)} ({plural(len(refused), 'weight')} like it): convert "
            "with qscheme: per_channel_symmetric and dtype: qint8"
        )


def _zero_points(zero_point: torch.Tensor) -> str:
    values = sorted(set(zero_point.reshape(-1).tolist()))
    return ", ".join(map(str, values[:3])) + (", ..." if len(values) > 3 else "")
