"""ONNX files of an artifact's modules: one model per module, checked for its target, written
together through :class:`refq_cli.io.outputs.Outputs` (all of them or none).

A module's file is named after it, ``encoder.lstm.onnx`` (``root.onnx`` for the module at the
root; other characters than letters, digits, ``_``, ``.`` and ``-`` as ``%XX``), in the output
folder.
"""

from __future__ import annotations

import fnmatch
import os
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from refq_cli.deploy import DEFAULT_OPSET, check_opset
from refq_cli.deploy.onnx_graph import module_model
from refq_cli.errors import ExportError, RefqWarning, argument, plural
from refq_cli.io.outputs import Outputs, check_outputs, starts_with
from refq_cli.kinds import ROOT
from refq_cli.spec.spec import MAX_GLOB

TARGETS = ("onnxruntime", "tensorrt")
# What TensorRT's explicit quantization takes: signed weights, zero points of 0.
_TENSORRT_DTYPES = ("qint8", "int4")
_PLAIN = re.compile(r"[A-Za-z0-9_.\-]")  # the characters a module's file name keeps as they are
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


def check_arguments(
    out_dir: object,
    *,
    module: object,
    opset: object,
    initial_states: object,
    target: object,
    force: object,
) -> Path:
    """Refuse arguments of an export before anything is read; returns ``out_dir`` as a path.
    (``True`` or ``False`` only for the switches: ``force="no"`` must not overwrite.)"""
    for name, value in (("initial_states", initial_states), ("force", force)):
        if type(value) is not bool:
            raise ExportError(f"{name}={value!r}: give True or False")
    if not isinstance(module, str):
        raise ExportError(f"{argument('module', module)}: give a glob, such as '*' or 'enc*'")
    if len(module) > MAX_GLOB:  # as refq inspect and the spec bound theirs
        raise ExportError(
            f"{argument('module', module[:20] + '...')}: a glob of {len(module)} characters; "
            f"at most {MAX_GLOB}"
        )
    if target is not None and target not in TARGETS:
        raise ExportError(f"{argument('target', target)}: use one of {', '.join(TARGETS)}")
    check_opset(opset)
    if not isinstance(out_dir, (str, os.PathLike)) or not os.fspath(out_dir):
        raise ExportError(f"{argument('out_dir', out_dir)}: give a folder's path")
    return Path(out_dir)


def export_modules(
    modules: Mapping[str, nn.Module],
    out_dir: str | os.PathLike[str],
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
    from, which no output may be. Every check comes before any file is written. A module that
    does not compute in float32 gets a model that does (the same integer weights), with a
    RefqWarning."""
    folder = check_arguments(
        out_dir,
        module=module,
        opset=opset,
        initial_states=initial_states,
        target=target,
        force=force,
    )
    chosen = {n: m for n, m in modules.items() if fnmatch.fnmatchcase(n, module)}
    if not chosen:
        raise ExportError(
            f"{argument('module', module)}: matches no module of {source}; it has "
            + ", ".join(modules)
        )
    if target is not None:
        check_target(chosen, target)
    paths = {name: folder / file for name, file in file_names(chosen, source).items()}
    files, inputs = [("out_dir", p) for p in paths.values()], {"artifact": source}
    check_outputs(files, inputs, force=force, replaceable=_REPLACEABLE)
    models = {  # before any folder is made: a module that cannot be exported leaves none
        name: _model(name, m, opset, initial_states) for name, m in chosen.items()
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


def _model(name: str, module: nn.Module, opset: int, initial_states: bool) -> Any:
    """Module ``name``'s ONNX model; its errors name it."""
    dtype = next(module.parameters()).dtype
    if dtype != torch.float32:
        warnings.warn(
            RefqWarning(
                f"module {name} computes in {str(dtype).removeprefix('torch.')}; its ONNX model "
                "computes in float32, with the same integer weights"
            ),
            stacklevel=3,
        )
    try:
        return module_model(module, opset=opset, initial_states=initial_states, name=name)
    except ExportError as exc:
        raise ExportError(f"module {name}: {exc}") from None


def file_stem(name: str) -> str:
    """The file name (without ``.onnx``) of module ``name``: the name itself where it holds
    only letters, digits, ``_``, ``.`` and ``-``; any other character (``/`` among them, and a
    leading ``.``) as ``%XX`` of its UTF-8 bytes, so that no name leaves the folder and two
    names never share a file. ``root`` for the root."""
    if name == ROOT:
        return "root"
    stem = "".join(c if _PLAIN.fullmatch(c) else _escaped(c) for c in name)
    return _escaped(".") + stem[1:] if stem.startswith(".") else stem


def _escaped(char: str) -> str:
    return "".join(f"%{b:02X}" for b in char.encode("utf-8", "surrogatepass"))


def file_names(names: Iterable[str], source: Path) -> dict[str, str]:
    """Each module's file name; two that only a case-insensitive file system would take for
    one (or ``<root>`` and ``root``) are refused, naming both."""
    files: dict[str, str] = {}
    seen: dict[str, str] = {}
    for name in names:
        files[name] = f"{file_stem(name)}.onnx"
        other = seen.setdefault(files[name].casefold(), name)
        if other != name:
            raise ExportError(
                f"{source}: modules {other} and {name} would both be written as "
                f"{files[name]} (on a file system that ignores case); export them into "
                f"different folders, one {argument('module', '...')} each"
            )
    return files


def check_target(modules: Mapping[str, nn.Module], target: str) -> None:
    """Refuse what ``target`` cannot run, naming the first weight and the spec that fits."""
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
