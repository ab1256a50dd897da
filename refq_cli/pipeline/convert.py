"""The conversion pipeline: checkpoint + spec -> reference modules -> artifact tensors + report.

``convert`` runs every check it can before the long work: the spec is read and validated
before the checkpoint is loaded, and the spec is resolved against the checkpoint's modules
before any weight is observed.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from refq_cli.errors import CheckpointError, RefqError, SpecError, argument
from refq_cli.io.checkpoint import Checkpoint, load_checkpoint, read_tensors
from refq_cli.io.outputs import Outputs
from refq_cli.io.recurrent import RecurrentModule
from refq_cli.io.safetensors_writer import SafetensorsWriter, check_header_fits
from refq_cli.kinds import FACTS, KINDS, display_path, facts_of
from refq_cli.pipeline.artifact import (
    artifact_header,
    artifact_metadata,
    module_metadata,
    weight_metadata,
)
from refq_cli.pipeline.gate import Gate
from refq_cli.pipeline.probe import module_output, probe_for, probe_result
from refq_cli.pipeline.report import ModuleRow, Report, WeightRow, build_report
from refq_cli.quant.numerics import WeightQParams
from refq_cli.quant.observers import observe
from refq_cli.quant.statistics import quantize_and_measure
from refq_cli.reference._weights import deferred_cache
from refq_cli.reference.registry import check_converter, check_readable, converted
from refq_cli.spec.spec import ModulePlan, Spec, as_spec, resolve


@dataclass
class ConvertedModule:
    info: RecurrentModule
    plan: ModulePlan
    float_module: nn.Module
    reference: nn.Module | None  # None when the spec skips the module
    qparams: dict[str, WeightQParams] = field(default_factory=dict)

    @property
    def config(self) -> dict[str, Any]:
        """Constructor arguments of the float module: inferred from weights, or facts."""
        keys = [*self.info.config, *facts_of(self.info.float_type)]
        return {k: getattr(self.float_module, k) for k in keys}

    def metadata(self, rows: Mapping[str, WeightRow], decomposed: bool) -> dict[str, Any]:
        """The module's entry in the artifact's ``refq.modules``; ``rows`` its weights' rows."""
        assert self.reference is not None
        weights = {
            name: weight_metadata(
                self.plan.weights[name],
                self.qparams.get(name),
                rows[name]["sqnr_db"] if name in self.qparams else None,
            )
            for name in self.info.weight_names
        }
        return module_metadata(
            self.info.float_type,
            self.reference._get_name(),
            self.config,
            next(self.float_module.parameters()).dtype,
            decomposed,
            weights,
        )


@dataclass(frozen=True)
class Conversion:
    """What a conversion made, each part built once and in this order: the modules, the
    report, the artifact's metadata; and, once its files are in place, where they are (the
    ``.rejected`` names when it missed its gate)."""

    checkpoint: Checkpoint
    spec: Spec
    modules: dict[str, ConvertedModule]  # by name (<root> for the root)
    report: Report
    metadata: dict[str, Any]
    output: Path | None = None
    report_json: Path | None = None
    report_md: Path | None = None

    @property
    def passed(self) -> bool:
        """False when the conversion missed its gate (its files were then set aside)."""
        gate = self.report.get("gate")
        return gate is None or gate["passed"]


def resolve_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise RefqError(f"{argument('device', device)}: not a device; use cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RefqError(
            f"{argument('device', device)}: CUDA is not available on this machine; use "
            f"{argument('device', 'cpu')}"
        )
    if dev.type not in ("cpu", "cuda"):
        raise RefqError(f"{argument('device', device)}: use cpu or cuda")
    return dev


def read_calibration(calibration: str | Path | None) -> dict[str, torch.Tensor]:
    """The probe inputs of a calibration file, by module name; messages name the argument."""
    if calibration is None:
        return {}
    try:
        return read_tensors(calibration, what="calibration")[2]
    except CheckpointError as exc:
        text, named = str(exc), str(calibration)
        if text.startswith(named + ":"):
            text = argument("calibration", calibration) + text[len(named) :]
        raise CheckpointError(text) from None


def convert_checkpoint(
    input_path: str | Path,
    spec: str | Path | Spec | Mapping[str, Any],
    output: str | Path,
    *,
    force: bool = False,
    device: str = "cpu",
    trust_code: bool = False,
    calibration: str | Path | None = None,
    progress: Callable[[str, int, int | None], None] | None = None,
    outputs: Outputs | None = None,
    gate: Gate | None = None,
) -> Conversion:
    """Convert one checkpoint as the spec (a path, a :class:`Spec` or a dict) says and write
    the artifact to ``output``: the work of :func:`refq_cli.convert`, which also writes the
    reports and sets a missed gate's files aside.

    Raises a RefqError subclass on bad input, and then writes nothing. ``progress(what, done,
    total)`` hears of each module as its conversion starts.

    The work streams: weights are quantized block by block, their codes go to the artifact
    as they come, and a multi-layer module is probed layer by layer, so memory holds about one
    layer's weights at a time, whatever the checkpoint's size.
    """
    started = time.perf_counter()
    step = progress or (lambda what, done, total: None)
    spec = as_spec(spec)
    dev = resolve_device(device)
    calibration_inputs = read_calibration(calibration)
    step("loading the checkpoint", 0, None)
    checkpoint = load_checkpoint(input_path, trust_code=trust_code, strip_prefix=spec.strip_prefix)
    checkpoint.check_has_modules()
    plans = resolve(
        spec,
        {p: m.weight_names for p, m in checkpoint.modules.items()},
        {p: m.float_type for p, m in checkpoint.modules.items()},
    )
    check_calibration_names(calibration, calibration_inputs, checkpoint.modules)
    for kind in dict.fromkeys(m.float_type for m in checkpoint.modules.values()):
        check_converter(getattr(nn, kind))
    _check_no_collisions(checkpoint, plans)
    _check_recorded_facts(checkpoint, plans)
    check_header_fits(_artifact_names(checkpoint, plans), path=output)

    modules: dict[str, ConvertedModule] = {}
    weight_rows: list[WeightRow] = []
    module_rows: list[ModuleRow] = []
    with SafetensorsWriter(Path(output), force=force, outputs=outputs) as writer:
        for done, (path, info) in enumerate(checkpoint.modules.items()):
            step(f"converting {display_path(path)}", done, len(checkpoint.modules))
            converting = _ModuleConversion(checkpoint, info, plans[path], spec, dev, writer)
            module_rows.append(converting.run(calibration_inputs.get(display_path(path))))
            weight_rows += converting.weight_rows
            modules[display_path(path)] = converting.result
        for key in checkpoint.other_tensor_names:
            writer.add(key, checkpoint.tensors[key])
            checkpoint.release([checkpoint.tensors[key]])
        report = build_report(
            checkpoint,
            Path(spec.path).name,
            weight_rows,
            module_rows,
            writer.size,
            assumed_facts(checkpoint, plans),
            seconds=round(time.perf_counter() - started, 3),
        )
        if gate is not None:
            report["gate"] = gate.judge(weight_rows)
        rows: dict[str, dict[str, WeightRow]] = {}
        for row in weight_rows:
            rows.setdefault(row["module"], {})[row["weight"]] = row
        entries = {
            m.info.path: m.metadata(rows.get(name, {}), spec.is_decomposed)
            for name, m in modules.items()
            if m.reference is not None
        }
        metadata = artifact_metadata(entries, spec.to_dict(), report)
        checkpoint.check_unchanged()  # its sha256 is in the metadata: it must cover these bytes
        writer.finish(artifact_header(metadata))
    return Conversion(checkpoint, spec, modules, report, metadata)


def _check_no_collisions(checkpoint: Checkpoint, plans: Mapping[str, ModulePlan]) -> None:
    """Refuse a checkpoint tensor named like a quantization parameter refq would write."""
    others = set(checkpoint.other_tensor_names)
    for path, info in checkpoint.modules.items():
        plan = plans[path]
        if plan.skip:
            continue
        for name in info.weight_names:
            if plan.weights[name].keeps_float:
                continue
            for key in (info.key(name) + "_scale", info.key(name) + "_zero_point"):
                if key in others:
                    raise CheckpointError(
                        f"{checkpoint.path}: tensor {key!r} collides with a quantization "
                        "parameter refq writes; rename it"
                    )


def check_calibration_names(
    calibration: str | Path | None, inputs: Mapping[str, Any], modules: Iterable[str]
) -> None:
    """Refuse calibration inputs named for no recurrent module: they would go unused."""
    shown = [display_path(p) for p in modules]
    unknown = set(inputs) - set(shown)
    if unknown:
        raise RefqError(
            f"{argument('calibration', calibration)}: {', '.join(sorted(unknown))} is no "
            f"recurrent module; modules: {', '.join(shown)}"
        )


def assumed_facts(
    checkpoint: Checkpoint, plans: Mapping[str, ModulePlan]
) -> dict[str, dict[str, Any]]:
    """By module (as specs name it): the facts weights cannot tell that neither the file nor
    the spec gave, with PyTorch's defaults, which the conversion assumed."""
    assumed = {}
    for path, info in checkpoint.modules.items():
        plan = plans[path]
        facts = {
            fact: FACTS[fact].default
            for fact in info.asked_facts
            if fact not in info.recorded and fact not in plan.facts
        }
        if facts and not plan.skip:
            assumed[display_path(path)] = facts
    return assumed


def _artifact_names(checkpoint: Checkpoint, plans: Mapping[str, ModulePlan]) -> Iterable[str]:
    """The names of the tensors the artifact will hold: every tensor of the checkpoint, and
    a scale and a zero point for each weight that is quantized."""
    yield from checkpoint.tensors
    for path, info in checkpoint.modules.items():
        plan = plans[path]
        for name in info.weight_names:
            if not plan.skip and not plan.weights[name].keeps_float:
                yield info.key(name) + "_scale"
                yield info.key(name) + "_zero_point"


def _check_recorded_facts(checkpoint: Checkpoint, plans: Mapping[str, ModulePlan]) -> None:
    """Refuse spec facts that contradict what the file's own modules record."""
    for path, info in checkpoint.modules.items():
        for key, setting in plans[path].facts.items():
            if key in info.recorded and info.recorded[key] != setting.value:
                raise SpecError(
                    f"{setting.loc}: modules.{display_path(path)}.{key} is {setting.value!r}, "
                    f"but {checkpoint.path} records {key}={info.recorded[key]!r} for this "
                    "module; remove it from the spec"
                )


class _ModuleConversion:
    """One recurrent module: observe, quantize and write its weights, probe it, one layer at a
    time (a cell is one layer), handing each layer's memory back before the next."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        info: RecurrentModule,
        plan: ModulePlan,
        spec: Spec,
        dev: torch.device,
        writer: SafetensorsWriter,
    ) -> None:
        self.checkpoint, self.info, self.plan, self.writer = checkpoint, info, plan, writer
        self.decomposed = spec.is_decomposed
        facts = {k: s.value for k, s in plan.facts.items()}
        float_module = info.build(checkpoint.tensors, facts).to(dev)
        self.result = ConvertedModule(info, plan, float_module, None)
        self.weight_rows: list[WeightRow] = []
        if dev.type != "cpu":  # the module works on its copies on the device
            self._release(info.tensor_names)

    def run(self, calibration: torch.Tensor | None) -> ModuleRow:
        """Convert the module; returns its row of the report."""
        info, module = self.info, self.result.float_module
        row: ModuleRow = {"path": display_path(info.path), "float_type": info.float_type}  # type: ignore[typeddict-item]
        row["skipped"] = self.plan.skip
        if self.plan.skip:
            for name in info.tensor_names:
                self._write_float(name)
            self._release(info.tensor_names)
            return row
        x = probe_for(module, calibration, info.path)
        cell = isinstance(module, nn.RNNCellBase)
        expected = got = x
        for layer, names in _layers(info):
            whole = layer is None or module.num_layers == 1
            float_layer = module if whole else _single_layer(module, layer)
            fake_quantized = {
                _layer_name(n): self._quantize(n) if self._quantized(n) else self._write_float(n)
                for n in names
            }
            with deferred_cache():
                ref_layer = converted(float_layer, self._qdict(names, _layer_name))
            ref_layer.use_quantized(  # type: ignore[attr-defined]
                {n: (None, v) for n, v in fake_quantized.items()}
            )
            expected = module_output(float_layer, expected, cell)
            got = module_output(ref_layer, got, cell)
            del fake_quantized, ref_layer
            self._release(names)
        if not cell:  # on CUDA, the one-layer modules took its tensors into buffers of their own
            module.flatten_parameters()
        with deferred_cache():  # its cache fills on first use, not while the others exist
            ref = converted(module, self._qdict(info.tensor_names)).train(False)
        check_readable(ref, info.float_type)
        self.result.reference = ref
        row["reference_type"] = ref._get_name()
        row["probe"] = "random" if calibration is None else "calibration"
        row.update(probe_result(expected, got, x, getattr(module, "batch_first", False)))
        return row

    def _qdict(self, names: Iterable[str], rename: Callable[[str], str] = str) -> dict[str, Any]:
        """The converter's ``weight_qparams_dict`` for the weights among ``names``."""
        qdict: dict[str, Any] = {"is_decomposed": self.decomposed}
        for name in names:
            if name.startswith("weight"):
                qdict[rename(name)] = self.result.qparams.get(name) or {"qscheme": None}
        return qdict

    def _release(self, names: Iterable[str]) -> None:
        self.checkpoint.release(self.checkpoint.tensors[self.info.key(n)] for n in names)

    def _quantized(self, name: str) -> bool:
        return name.startswith("weight") and not self.plan.weights[name].keeps_float

    def _write_float(self, name: str) -> torch.Tensor:
        tensor = getattr(self.result.float_module, name)
        self.writer.add(self.info.key(name), tensor)
        return tensor

    def _quantize(self, name: str) -> torch.Tensor:
        """Observe, quantize and measure one weight; write its codes and parameters; return
        its fake-quantized values."""
        weight = getattr(self.result.float_module, name).detach()
        where = f"{display_path(self.info.path)}.{name}"
        if weight.numel() and not all(math.isfinite(v) for v in torch.aminmax(weight)):
            raise CheckpointError(f"{self.checkpoint.path}: {where} holds NaN or infinite values")
        qp = self.result.qparams[name] = observe(weight, self.plan.weights[name], where)
        key = self.info.key(name)
        self.writer.begin(key, qp.storage, tuple(weight.shape))
        values, stats = quantize_and_measure(weight, qp, self.decomposed, self.writer.write)
        self.writer.end()
        self.writer.add(key + "_scale", qp.scale)
        self.writer.add(key + "_zero_point", qp.zero_point)
        observer = self.plan.weights[name].observer
        self.weight_rows.append(
            {
                "module": display_path(self.info.path),
                "weight": name,
                "observer": observer,
                **stats,
                "qscheme": self.plan.weights[name].qscheme,  # as the spec says it, not as stored
            }
        )
        return values


def _layers(info: RecurrentModule) -> list[tuple[int | None, list[str]]]:
    """The module's tensors by layer (both directions together); one group for a cell."""
    if KINDS[info.float_type].cell:
        return [(None, list(info.tensor_names))]
    layers: dict[int, list[str]] = {}
    for name in info.tensor_names:
        layers.setdefault(int(_LAYER.search(name).group(1)), []).append(name)  # type: ignore[union-attr]
    return list(layers.items())


_LAYER = re.compile(r"_l(\d+)(?=(?:_reverse)?$)")  # the layer number in weight_ih_l3_reverse


def _layer_name(name: str) -> str:
    """``weight_ih_l3_reverse`` -> ``weight_ih_l0_reverse``: the name in a one-layer module."""
    return _LAYER.sub("_l0", name)


def _single_layer(module: nn.Module, layer: int) -> nn.Module:
    """Layer ``layer`` of a multi-layer RNN, LSTM or GRU as a one-layer module of the same
    type, sharing its tensors: running the layers one after another computes what the whole
    module computes (in eval mode, where dropout between layers is off)."""
    out_size = module.proj_size or module.hidden_size
    config = {a: getattr(module, a) for a in KINDS[type(module).__name__].arguments}
    config |= {  # one layer, whose input is the layer before's output; no dropout after it
        "input_size": module.input_size if layer == 0 else out_size * (1 + module.bidirectional),
        "num_layers": 1,
        "dropout": 0.0,
    }
    first = next(module.parameters())
    single = type(module)(**config, device="meta", dtype=first.dtype)
    tensors = {
        _layer_name(n): getattr(module, n)
        for n in module._flat_weights_names
        if _LAYER.search(n).group(1) == str(layer)  # type: ignore[union-attr]
    }
    single.load_state_dict(tensors, strict=True, assign=True)
    # On CUDA, cuDNN's layout: the shared tensors move into a buffer of this layer's own (the
    # caller flattens the whole module again afterwards); elsewhere nothing.
    single.flatten_parameters()
    return single.train(False)
