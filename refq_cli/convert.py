"""The conversion pipeline: checkpoint + spec -> reference modules -> artifact tensors + report.

``convert`` runs every check it can before the long work: the spec is read and validated
before the checkpoint is loaded, and the spec is resolved against the checkpoint's modules
before any weight is observed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from refq_cli import __version__, reference
from refq_cli.checkpoint import Checkpoint, RecurrentModule, load_checkpoint, read_tensors
from refq_cli.errors import CheckpointError, RefqError
from refq_cli.observers import observe
from refq_cli.quant import WeightQParams, dequantize, quantize
from refq_cli.registry import converter_for
from refq_cli.report import probe_for, probe_module, weight_stats
from refq_cli.spec import ModulePlan, Spec, display_path, load_spec, resolve


@dataclass
class ConvertedModule:
    info: RecurrentModule
    plan: ModulePlan
    float_module: nn.Module
    reference: nn.Module | None  # None when the spec skips the module
    qparams: dict[str, WeightQParams] = field(default_factory=dict)
    codes: dict[str, torch.Tensor] = field(default_factory=dict)  # integer codes, on the CPU

    @property
    def config(self) -> dict[str, Any]:
        """Constructor arguments of the float module: inferred from weights, or spec facts."""
        keys = list(self.info.config)
        if not self.info.float_type.endswith("Cell"):
            keys += ["batch_first", "dropout"]
        if self.info.float_type in ("RNN", "RNNCell"):
            keys.append("nonlinearity")
        return {k: getattr(self.float_module, k) for k in keys}


@dataclass
class Conversion:
    checkpoint: Checkpoint
    spec: Spec
    modules: dict[str, ConvertedModule]
    report: dict[str, Any]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The artifact's tensors: codes, scales and zero points in place of float weights."""
        out: dict[str, torch.Tensor] = {}
        owned = set()
        for m in self.modules.values():
            if m.reference is None:
                continue
            for name in m.info.tensor_names:
                key = m.info.key(name)
                owned.add(key)
                tensor = getattr(m.float_module, name)
                qp = m.qparams.get(name)
                if qp is None:
                    out[key] = tensor.detach()
                    continue
                out[key] = m.codes[name]
                out[key + "_scale"] = qp.scale
                out[key + "_zero_point"] = qp.zero_point
        for key, tensor in self.checkpoint.tensors.items():
            if key in owned:
                continue
            if key in out:
                raise CheckpointError(
                    f"{self.checkpoint.path}: tensor {key!r} collides with a quantization "
                    "parameter refq writes; rename it"
                )
            out[key] = tensor
        return out

    def metadata(self) -> dict[str, Any]:
        modules = {}
        stats = {(w["module"], w["weight"]): w for w in self.report["weights"]}
        for path, m in self.modules.items():
            if m.reference is None:
                continue
            weights = {}
            for name in m.info.weight_names:
                spec = m.plan.weights[name]
                qp = m.qparams.get(name)
                entry: dict[str, Any] = {"qscheme": "none", "observer": spec.observer}
                if qp is not None:
                    entry.update(
                        qscheme=qp.qscheme,
                        dtype=qp.dtype,
                        axis=qp.axis if qp.per_channel else None,
                        quant_min=qp.quant_min,
                        quant_max=qp.quant_max,
                        sqnr_db=stats[(path, name)]["sqnr_db"],
                    )
                weights[name] = entry
            modules[path] = {
                "float_type": m.info.float_type,
                "reference_type": m.reference._get_name(),
                "config": m.config,
                "float_dtype": str(next(m.float_module.parameters()).dtype).removeprefix("torch."),
                "is_decomposed": self.spec.is_decomposed,
                "weights": weights,
            }
        return {
            "refq.modules": modules,
            "refq.spec": self.spec.to_dict(),
            "refq.source": self.report["source"],
            "refq.producer": {"refq": __version__, "torch": torch.__version__.split("+")[0]},
        }

    def below(self, min_sqnr: float) -> list[str]:
        """Weights whose SQNR is under ``min_sqnr`` dB (exact weights never are)."""
        return [
            f"{w['module']}.{w['weight']} ({w['sqnr_db']:.2f} dB)"
            for w in self.report["weights"]
            if w["sqnr_db"] is not None and w["sqnr_db"] < min_sqnr
        ]


def resolve_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise RefqError(f"--device {device}: not a device; use cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RefqError("--device cuda: CUDA is not available on this machine; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise RefqError(f"--device {device}: use cpu or cuda")
    return dev


def convert(
    input_path: str | Path,
    spec_path: str | Path,
    *,
    device: str = "cpu",
    trust_pickle: bool = False,
    calibration: str | Path | None = None,
    progress: Callable[[str, int, int | None], None] | None = None,
) -> Conversion:
    """Convert one checkpoint as the spec says. Raises a RefqError subclass on bad input.

    ``progress(what, done, total)`` hears of each module as its conversion starts.
    """
    started = time.perf_counter()
    step = progress or (lambda what, done, total: None)
    spec = load_spec(spec_path)
    dev = resolve_device(device)
    calibration_inputs = read_tensors(Path(calibration))[2] if calibration else {}
    step("loading the checkpoint", 0, None)
    checkpoint = load_checkpoint(input_path, trust_pickle=trust_pickle)
    if not checkpoint.modules:
        raise CheckpointError(
            f"{input_path}: no recurrent module found (looked for weight_ih/weight_hh keys)"
        )
    plans = resolve(
        spec,
        {p: m.weight_names for p, m in checkpoint.modules.items()},
        {p: m.float_type for p, m in checkpoint.modules.items()},
    )
    unknown = set(calibration_inputs) - {display_path(p) for p in checkpoint.modules}
    if unknown:
        raise RefqError(
            f"--calibration {calibration}: {', '.join(sorted(unknown))} is no recurrent module; "
            f"modules: {', '.join(display_path(p) for p in checkpoint.modules)}"
        )

    modules: dict[str, ConvertedModule] = {}
    weight_rows: list[dict[str, Any]] = []
    module_rows: list[dict[str, Any]] = []
    for done, (path, info) in enumerate(checkpoint.modules.items()):
        step(f"converting {display_path(path)}", done, len(checkpoint.modules))
        plan = plans[path]
        facts = {k: s.value for k, s in plan.facts.items()}
        float_module = info.build(checkpoint.tensors, facts).to(dev)
        converted = ConvertedModule(info, plan, float_module, None)
        modules[path] = converted
        row: dict[str, Any] = {"path": path, "float_type": info.float_type, "skipped": plan.skip}
        module_rows.append(row)
        if plan.skip:
            continue
        qdict: dict[str, Any] = {"is_decomposed": spec.is_decomposed}
        for name in info.weight_names:
            wspec = plan.weights[name]
            if wspec.keeps_float:
                qdict[name] = {"qscheme": None}
                continue
            weight = getattr(float_module, name)
            if not bool(torch.isfinite(weight).all()):
                raise CheckpointError(
                    f"{input_path}: {display_path(path)}.{name} holds NaN or infinite values"
                )
            converted.qparams[name] = qdict[name] = observe(
                weight, wspec, f"{display_path(path)}.{name}"
            )
        ref = converted.reference = converter_for(float_module)(float_module, qdict)
        fake_quantized = {}
        for name, qp in converted.qparams.items():
            # each weight is quantized once: the codes written, and their values for the rest
            weight = getattr(float_module, name)
            codes = quantize(weight, qp, decomposed=spec.is_decomposed)
            converted.codes[name] = codes.cpu()
            fake_quantized[name] = dequantize(codes, qp, decomposed=spec.is_decomposed).to(
                weight.dtype
            )
            stats = weight_stats(weight, qp, spec.is_decomposed, fake_quantized[name])
            weight_rows.append(
                {"module": path, "weight": name, "observer": plan.weights[name].observer, **stats}
            )
        if hasattr(ref, "use_fake_quantized"):  # refq's own modules; others quantize themselves
            ref.use_fake_quantized(fake_quantized)
        x = probe_for(float_module, calibration_inputs.get(display_path(path)), path)
        row["reference_type"] = ref._get_name()
        row["probe"] = "calibration" if display_path(path) in calibration_inputs else "random"
        row.update(probe_module(float_module, ref, x))
        if hasattr(ref, "invalidate_cache"):
            ref.invalidate_cache()  # free the fake-quantized copies before the next module

    conversion = Conversion(checkpoint, spec, modules, {})
    conversion.report = _report(conversion, weight_rows, module_rows, spec_path)
    conversion.report["totals"]["seconds"] = round(time.perf_counter() - started, 3)
    return conversion


def _report(
    conversion: Conversion,
    weight_rows: list[dict[str, Any]],
    module_rows: list[dict[str, Any]],
    spec_path: str | Path,
) -> dict[str, Any]:
    ckpt = conversion.checkpoint
    float_bytes = sum(t.numel() * t.element_size() for t in ckpt.tensors.values())
    quantized_bytes = sum(t.numel() * t.element_size() for t in conversion.tensors().values())
    sqnrs = [w["sqnr_db"] for w in weight_rows if w["sqnr_db"] is not None]
    return {
        "refq_version": __version__,
        "source": {"name": ckpt.path.name, "sha256": ckpt.sha256, "format": ckpt.format},
        "spec": Path(spec_path).name,
        "weights": weight_rows,
        "modules": module_rows,
        "totals": {
            "float_bytes": float_bytes,
            "quantized_bytes": quantized_bytes,
            "compression_ratio": float_bytes / quantized_bytes if quantized_bytes else 0.0,
            "weights_quantized": len(weight_rows),
            "worst_sqnr_db": min(sqnrs) if sqnrs else None,
        },
    }


# --- reading artifacts back -------------------------------------------------------------------


def reference_from_artifact(
    path: str, info: Mapping[str, Any], tensors: dict[str, torch.Tensor], source: Path
) -> nn.Module:
    """Rebuild one reference module from artifact tensors; consumes its tensors from the dict."""
    from refq_cli.artifact import ArtifactError

    def take(key: str) -> torch.Tensor:
        try:
            return tensors.pop(key)
        except KeyError:
            raise ArtifactError(f"{source}: tensor {key!r} is missing") from None

    def key(name: str) -> str:
        return f"{path}.{name}" if path else name

    cls = getattr(reference, info["float_type"], None)
    if cls is None:
        raise ArtifactError(f"{source}: unknown module type {info['float_type']!r} at {path!r}")
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
    ref = cls(**info["config"], dtype=dtype, weight_qparams_dict=qdict)
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
            value = dequantize(value, qp, decomposed=ref.is_decomposed).to(dtype)
        setattr(ref, name, nn.Parameter(value))
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
            problems.append(f"{k}: model has {mine}, artifact has {v}")
    param = next(module.parameters(), None)
    dtype = str(param.dtype).removeprefix("torch.") if param is not None else None
    if dtype is not None and dtype != info["float_dtype"]:
        problems.append(f"dtype: model has {dtype}, artifact has {info['float_dtype']}")
    return problems
