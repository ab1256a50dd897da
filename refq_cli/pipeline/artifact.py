"""The artifact, format 1: a safetensors file of integer weights, their parameters and metadata.

For each converted module at path ``P`` and quantized weight ``W``: ``P.W`` (integer codes, the
float weight's shape), ``P.W_scale`` (float32, 0-d or 1-d) and ``P.W_zero_point`` (int32, same
shape). Biases, weights kept float and every other tensor are stored as they were. Metadata
(strings): ``format``, ``refq.format_version``, ``refq.modules``, ``refq.spec``,
``refq.source``, ``refq.producer``, the last four as JSON, and ``refq.calibration`` (the
calibration file's name and sha256, JSON) when the codes depend on one; a weight's entry in
``refq.modules`` names its ``rounding`` when it is not nearest. Tensors are stored module by module
as they are converted, then every other tensor in the checkpoint's order. No timestamps: the same
input and spec give byte-identical files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from refq_cli import __version__
from refq_cli.deploy import DEFAULT_OPSET
from refq_cli.deploy.onnx_files import ExportedModel, export_modules
from refq_cli.errors import ArtifactError, RefqError, shorten, strict_json
from refq_cli.io.header import FORMAT, FORMAT_VERSION, read_artifact
from refq_cli.kinds import FACTS, ROOT, display_path, module_path, tensor_key
from refq_cli.quant.numerics import WeightQParams
from refq_cli.reference._weights import deferred_cache
from refq_cli.reference.registry import RegistryError, reader_for
from refq_cli.spec.spec import QParamSpec


def weight_metadata(
    spec: QParamSpec, qp: WeightQParams | None, sqnr_db: float | None
) -> dict[str, Any]:
    """A weight's entry in a module's metadata: how it was quantized, or ``none`` (kept float).
    ``qscheme`` is the stored form (a symmetric scheme as its affine counterpart, which the
    reference modules read); ``spec_qscheme`` the scheme the spec asked for, which refq shows."""
    entry: dict[str, Any] = {"qscheme": "none", "observer": spec.observer}
    if qp is not None:
        entry.update(
            qscheme=qp.qscheme,
            spec_qscheme=spec.qscheme,
            dtype=qp.dtype,
            axis=qp.axis if qp.per_channel else None,
            quant_min=qp.quant_min,
            quant_max=qp.quant_max,
            sqnr_db=sqnr_db,
        )
        if spec.rounding != "nearest":  # recorded only when not nearest: older bytes stay
            entry["rounding"] = spec.rounding
    return entry


def module_metadata(
    float_type: str,
    reference_type: str,
    config: dict[str, Any],
    float_dtype: torch.dtype,
    is_decomposed: bool,
    weights: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """A module's entry in ``refq.modules``: what :func:`reference_from_artifact` rebuilds it
    from, checked on reading by :func:`refq_cli.io.header.check_metadata`."""
    return {
        "float_type": float_type,
        "reference_type": reference_type,
        "config": config,
        "float_dtype": str(float_dtype).removeprefix("torch."),
        "is_decomposed": is_decomposed,
        "weights": weights,
    }


def artifact_metadata(
    modules: dict[str, dict[str, Any]],
    spec: dict[str, Any],
    report: Mapping[str, Any],
    calibration: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The artifact's metadata: its modules' entries, the resolved spec, the source and producer
    from the report, the gate and its verdict when the report has one, and the calibration
    file (name, sha256) when the codes depend on it (observer output, rounding gptq)."""
    metadata = {
        "refq.modules": modules,
        "refq.spec": spec,
        "refq.source": report["source"],
        "refq.producer": {"refq": __version__, "torch": torch.__version__.split("+")[0]},
    }
    if "gate" in report:  # the --min-sqnr asked for and its verdict
        gate = report["gate"]
        metadata["refq.gate"] = {"min_sqnr": gate["min_sqnr_db"], "passed": gate["passed"]}
    if calibration is not None:
        metadata["refq.calibration"] = dict(calibration)
    return metadata


def artifact_header(metadata: Mapping[str, Any]) -> dict[str, str]:
    """The safetensors metadata of an artifact: format keys, then ``metadata`` as JSON strings."""
    header = {"format": FORMAT, "refq.format_version": str(FORMAT_VERSION)}
    for key, value in metadata.items():
        header[key] = (
            value if isinstance(value, str) else strict_json(value, indent=None, sort_keys=True)
        )
    return header


@dataclass
class Artifact:
    """An artifact read back: runnable reference modules, by name (``<root>`` for a module at
    the root, whose key in the metadata is ``""``), and every other tensor.

    The modules are in eval mode, as the conversion measured them: dropout between layers is
    off, so the same input gives the same output. ``module.train()`` turns it back on.
    """

    path: Path
    modules: dict[str, nn.Module]
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, Any]

    def export_onnx(
        self,
        out_dir: str | os.PathLike[str],
        *,
        module: str = "*",
        opset: int = DEFAULT_OPSET,
        initial_states: bool = True,
        target: str | None = None,
        force: bool = False,
    ) -> list[ExportedModel]:
        """Write one ONNX model per module (those matching the glob ``module``) into
        ``out_dir``, ``encoder.lstm.onnx`` (``root.onnx`` for the root): integer weight
        initializers through DequantizeLinear into ONNX's LSTM, GRU and RNN operators (a Scan
        for an LSTM with ``proj_size``); inputs ``input`` (and, with ``initial_states``,
        ``h_0``, ``c_0``), outputs as the module returns them, dynamic batch and sequence.
        ``target="tensorrt"`` refuses weights TensorRT cannot take. Needs ``refq[onnx]``."""
        return export_modules(
            self.modules,
            out_dir,
            source=self.path,
            module=module,
            opset=opset,
            initial_states=initial_states,
            target=target,
            force=force,
        )

    def apply_to(self, model: nn.Module, *, strip_prefix: str | None = None) -> nn.Module:
        """Swap the reference modules into ``model`` and load every other tensor into it.

        ``strip_prefix`` maps the artifact's names onto the model's: an artifact converted from
        a Lightning checkpoint holds ``model.lstm``, which ``strip_prefix="model."`` puts at
        ``model.lstm``'s place in the bare model, ``lstm`` (its other tensors likewise; those
        without the prefix keep their names).

        Everything is checked before anything changes: where the model's modules or tensors do
        not match the artifact's, ArtifactError says how, and the model is left as it was.
        Returns the model (or the reference module itself when the artifact's module is the
        root). The swapped-in modules stay in eval mode whatever mode the model is in (the
        rest of the model keeps its own); ``model.train()`` afterwards puts them in training
        mode, with dropout, like any other module.
        """
        rename = _renaming(strip_prefix)
        infos = self.metadata["refq.modules"]
        places = {}
        for name in self.modules:
            path = module_path(rename(name))
            try:
                places[name] = model.get_submodule(path) if path else model
            except AttributeError:
                raise ArtifactError(
                    f"{self.path}: the model has no module at {path!r}"
                    + _prefix_hint(model, path, strip_prefix)
                ) from None
            problems = check_module_matches(places[name], infos[module_path(name)])
            if problems:
                raise ArtifactError(
                    f"{self.path}: {path or ROOT} differs from the artifact: " + "; ".join(problems)
                )
        root = next((ref for name, ref in self.modules.items() if rename(name) == ROOT), None)
        if root is not None:
            return root
        own = model.state_dict()
        tensors = {rename(name): tensor for name, tensor in self.tensors.items()}
        for name, tensor in tensors.items():
            if name not in own:
                raise ArtifactError(f"{self.path}: the model has no place for tensor {name!r}")
            if own[name].shape != tensor.shape:
                raise ArtifactError(
                    f"{self.path}: tensor {name!r} has shape {tuple(tensor.shape)}, the model's "
                    f"{tuple(own[name].shape)}"
                )
        for name, ref in self.modules.items():
            parent_path, _, attribute = rename(name).rpartition(".")
            setattr(model.get_submodule(parent_path) if parent_path else model, attribute, ref)
        model.load_state_dict(tensors, strict=False)
        return model


def _renaming(strip_prefix: str | None) -> Callable[[str], str]:
    """The artifact's name -> the model's, for ``apply_to(strip_prefix=...)``."""
    if strip_prefix is None:
        return lambda name: name
    prefix = strip_prefix if strip_prefix.endswith(".") else strip_prefix + "."
    if prefix == ".":
        raise ArtifactError("strip_prefix='': give the prefix to strip, such as 'model.'")
    return lambda name: ROOT if name == prefix[:-1] else name.removeprefix(prefix)


def _prefix_hint(model: nn.Module, path: str, strip_prefix: str | None) -> str:
    """When the model has the module once a wrapper's first path component is gone."""
    wrapper, dot, rest = path.partition(".")
    if strip_prefix is not None or not dot:
        return ""
    try:
        model.get_submodule(rest)
    except AttributeError:
        return ""
    return f"; it has {rest!r}: pass strip_prefix={wrapper + '.'!r}"


def load_artifact(path: str | Path) -> Artifact:
    """Read an artifact written by ``refq convert`` into runnable reference modules."""
    from safetensors.torch import load_file

    path = Path(path)
    _, metadata = read_artifact(path)  # checked against the tensors' shapes, no data read yet
    from safetensors import SafetensorError

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise ArtifactError(f"{path}: corrupt or truncated artifact: {exc}") from None
    modules = {}
    for stored, info in metadata["refq.modules"].items():
        try:
            ref = reference_from_artifact(stored, info, tensors, path)
            modules[display_path(stored)] = ref.train(False)
        except ArtifactError:
            raise
        except (RefqError, KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
            raise ArtifactError(
                f"{path}: module {shorten(display_path(stored))} cannot be rebuilt from the "
                f"artifact: {type(exc).__name__}: {exc}"
            ) from None
    return Artifact(path, modules, tensors, metadata)


def reference_from_artifact(
    path: str, info: Mapping[str, Any], tensors: dict[str, torch.Tensor], source: Path
) -> nn.Module:
    """Rebuild one reference module from artifact tensors; consumes its tensors from the dict."""

    def take(key: str) -> torch.Tensor:
        try:
            return tensors.pop(key)
        except KeyError:
            raise ArtifactError(f"{source}: tensor {key!r} is missing") from None

    def key(name: str) -> str:
        return tensor_key(path, name)

    try:
        cls = reader_for(info.get("reference_type"), info["float_type"])
    except RegistryError as exc:
        raise ArtifactError(f"{source}: module {shorten(display_path(path))}: {exc}") from None
    qdict: dict[str, Any] = {"is_decomposed": info["is_decomposed"]}
    for name, w in info["weights"].items():
        if w["qscheme"] == "none":
            qdict[name] = {"qscheme": None}
            continue
        qdict[name] = {
            "qscheme": w["qscheme"],
            "dtype": w["dtype"],
            "scale": take(key(name) + "_scale"),
            "zero_point": take(key(name) + "_zero_point"),
            "axis": w["axis"] if w["axis"] is not None else 0,
            "quant_min": w["quant_min"],
            "quant_max": w["quant_max"],
        }
    dtype = getattr(torch, info["float_dtype"])
    with deferred_cache():  # its cache is filled below, with the codes the artifact holds
        ref = cls(**info["config"], dtype=dtype, weight_qparams_dict=qdict)
    codes: dict[str, torch.Tensor] = {}
    for name in ref._computation_names():
        expected = getattr(ref, name, None)
        if expected is None:
            continue
        value = take(key(name))
        qp = ref.weight_qparams(name)
        want = qp.storage if qp is not None else dtype
        if value.shape != expected.shape or value.dtype != want:
            raise ArtifactError(
                f"{source}: tensor {key(name)!r} is {str(value.dtype).removeprefix('torch.')} "
                f"{tuple(value.shape)}, but the module's metadata needs "
                f"{str(want).removeprefix('torch.')} {tuple(expected.shape)}"
            )
        if qp is not None:
            if value.numel() and not qp.quant_min <= value.min() <= value.max() <= qp.quant_max:
                raise ArtifactError(
                    f"{source}: tensor {key(name)!r} holds codes outside its range "
                    f"{qp.quant_min}..{qp.quant_max}"
                )
            codes[name] = value.clone()  # a copy: not the file's mapped pages
        else:
            setattr(ref, name, nn.Parameter(value))
    ref.set_quantized_weights(codes)
    return ref


def check_module_matches(module: nn.Module, info: Mapping[str, Any]) -> list[str]:
    """How ``module`` differs from the float module an artifact entry was converted from."""
    problems = []
    if type(module).__name__ != info["float_type"]:
        problems.append(
            f"type: model has {type(module).__name__}, artifact has {info['float_type']}"
        )
        return problems
    for k, v in info["config"].items():
        mine = getattr(module, k, None)
        if mine != v:
            fix = ""
            if k in FACTS:  # weights cannot tell it: the spec said so, or assumed it
                fix = f" (set {k}: {json.dumps(mine)} for this module under modules: in the spec)"
            problems.append(f"{k}: model has {mine}, artifact has {v}{fix}")
    param = next(module.parameters(), None)
    dtype = str(param.dtype).removeprefix("torch.") if param is not None else None
    if dtype is not None and dtype != info["float_dtype"]:
        problems.append(f"dtype: model has {dtype}, artifact has {info['float_dtype']}")
    return problems
