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

from refq_cli.errors import CheckpointError, QParamsError, RefqError, SpecError, argument
from refq_cli.io.checkpoint import Checkpoint, load_checkpoint
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
from refq_cli.pipeline.calibration import (
    Call,
    batched,
    calls_for,
    held_out_masks,
    read_calibration_file,
    select,
    without_prefix,
)
from refq_cli.pipeline.gate import Gate
from refq_cli.pipeline.layer_inputs import layer_hessians
from refq_cli.pipeline.probe import (
    calibration_result,
    calls_result,
    check_finite,
    default_outputs,
    measured_outputs,
    probe_shape,
    random_call,
)
from refq_cli.pipeline.report import ModuleRow, Report, WeightRow, build_report
from refq_cli.quant.calibrated import gptq_values
from refq_cli.quant.numerics import WeightQParams, fake_quantize
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
    calibration_file = read_calibration_file(calibration)
    calibration_inputs = without_prefix(calibration_file, spec.strip_prefix)
    step("loading the checkpoint", 0, None)
    checkpoint = load_checkpoint(input_path, trust_code=trust_code, strip_prefix=spec.strip_prefix)
    checkpoint.check_has_modules()
    plans = resolve(
        spec,
        {p: m.weight_names for p, m in checkpoint.modules.items()},
        {p: m.float_type for p, m in checkpoint.modules.items()},
    )
    check_calibration_names(calibration, calibration_inputs, checkpoint.modules)
    _check_calibrated(plans, calibration_inputs, calibration)
    calibration_source = None  # recorded when the codes depend on it: --skip-unchanged sees it
    if calibration is not None and any(
        w.needs_calibration for p in plans.values() if not p.skip for w in p.weights.values()
    ):
        # the bytes the calls were read from: a file that changes afterwards is out of date
        calibration_source = {"name": Path(calibration).name, "sha256": calibration_file.sha256}
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
            given = calibration_inputs.get(display_path(path))
            if given is not None:
                given = calls_for(converting.result.float_module, given, display_path(path))
            module_rows.append(converting.run(given))
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
        metadata = artifact_metadata(entries, spec.to_dict(), report, calibration_source)
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


def _check_calibrated(
    plans: Mapping[str, ModulePlan], inputs: Mapping[str, Any], calibration: str | Path | None
) -> None:
    """Refuse a spec whose observer or rounding needs calibration inputs a module lacks."""
    for path, plan in plans.items():
        if plan.skip or display_path(path) in inputs:
            continue
        for name, spec in plan.weights.items():
            if spec.needs_calibration:
                setting = (
                    "observer output" if spec.observer == "output" else f"rounding {spec.rounding}"
                )
                loc = spec.origin.get("observer" if spec.observer == "output" else "rounding")
                given = (
                    f"{argument('calibration', calibration)} has no inputs for it"
                    if calibration is not None
                    else "no calibration file was given"
                )
                raise SpecError(
                    f"{f'{loc}: ' if loc else ''}{display_path(path)}.{name}: {setting} needs "
                    f"calibration inputs, and {given}; record them with "
                    "refq_cli.record_calibration and pass the file with "
                    f"{argument('calibration', 'FILE')}"
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
        self.probe = spec.probe
        facts = {k: s.value for k, s in plan.facts.items()}
        float_module = info.build(checkpoint.tensors, facts).to(dev)
        self.result = ConvertedModule(info, plan, float_module, None)
        self.weight_rows: list[WeightRow] = []
        self.codes: dict[str, torch.Tensor] = {}  # GPTQ's codes, by weight name
        # Fake-quantized values live in tensors that a later layer's weights of the same shape
        # reuse once the layer's probe is done: fresh memory costs a page fault every 4 kB
        # (about 0.3 s of a default conversion of the 576 MB benchmark checkpoint).
        self.spare: dict[tuple, list[torch.Tensor]] = {}  # by (shape, dtype)
        self.lent: list[torch.Tensor] = []  # to the layer being converted
        if dev.type != "cpu":  # the module works on its copies on the device
            self._release(info.tensor_names)

    def run(self, given: list[Call] | None) -> ModuleRow:
        """Convert the module on its calibration calls (checked, time-major), or on the seeded
        random probe when there are none (with ``probe_steps: 0``, on the calibration calls
        only where calibrated weights need them, else on nothing); returns its row of the
        report."""
        info, module = self.info, self.result.float_module
        row: ModuleRow = {"path": display_path(info.path), "float_type": info.float_type}  # type: ignore[typeddict-item]
        row["skipped"] = self.plan.skip
        if self.plan.skip:
            for name in info.tensor_names:
                self._write_float(name)
            self._release(info.tensor_names)
            return row
        cell = isinstance(module, nn.RNNCellBase)
        measure = not self.probe.off  # else only Hessians need the float layers run
        calibrated = any(
            self._quantized(n) and self.plan.weights[n].needs_calibration for n in info.weight_names
        )
        calls = given or ([random_call(module, self.probe)] if measure else [])
        if not (measure or calibrated):
            calls = []
        calls, fit = batched(calls, [~held for held in held_out_masks(calls)])
        runs: dict[str, list[torch.Tensor]] = {"float": [c.input for c in calls]}
        if measure:
            runs["quantized"] = list(runs["float"])
        if measure and any(
            self._quantized(n) and self.plan.weights[n].rounding != "nearest"
            for n in info.weight_names
        ):
            runs["nearest"] = list(runs["float"])  # the same scales, each weight rounded to nearest
        finals: dict[str, list[list[tuple]]] = {k: [[] for _ in calls] for k in runs}
        directions = 1 if cell else 1 + module.bidirectional
        for layer, names in _layers(info):
            whole = layer is None or module.num_layers == 1
            float_layer = module if whole else _single_layer(module, layer)
            inputs = {
                k: [_layer_call(c, x, layer, directions) for c, x in zip(calls, xs, strict=True)]
                for k, xs in runs.items()
            }
            # the probe alone runs the float and the reference layer at once; with calibrated
            # weights, the float layer's outputs come first: its Hessians come from them
            paired = "quantized" in runs and not calibrated
            outputs: dict[str, list[tuple[torch.Tensor, tuple]]] = {k: [] for k in runs}
            if not paired:
                outputs["float"] = default_outputs(float_layer, inputs["float"], cell)
            needed = [
                _layer_name(n)
                for n in names
                if self._quantized(n) and self.plan.weights[n].needs_calibration
            ]
            hessians = (
                layer_hessians(
                    float_layer,
                    [select(c, keep) for c, keep in zip(inputs["float"], fit, strict=True)],
                    [
                        output[:, keep.to(output.device)]
                        for (output, _), keep in zip(outputs["float"], fit, strict=True)
                    ],
                    needed,
                )
                if needed
                else {}
            )
            values = {
                _layer_name(n): self._quantize(n, hessians.get(_layer_name(n)))
                if self._quantized(n)
                else (self._write_float(n),) * 2
                for n in names
            }
            layers = {}
            for k, pick in (("quantized", 0), ("nearest", 1)):
                if k in runs:
                    with deferred_cache():
                        layers[k] = converted(float_layer, self._qdict(names, _layer_name))
                    layers[k].use_quantized({n: (None, v[pick]) for n, v in values.items()})  # type: ignore[operator]
                    if not paired:
                        outputs[k] = default_outputs(layers[k], inputs[k], cell)
            if paired:
                outputs["float"], outputs["quantized"] = measured_outputs(
                    float_layer, inputs["float"], layers["quantized"], inputs["quantized"], cell
                )
            for k in runs:
                runs[k] = [output for output, _ in outputs[k]]
                for states, (_, final) in zip(finals[k], outputs[k], strict=True):
                    states.append(final)
            del values, layers, hessians, outputs
            for t in self.lent:  # nothing holds them now: the next layer writes over them
                self.spare.setdefault((t.shape, t.dtype), []).append(t)
            self.lent = []
            self._release(names)
        if not cell:  # on CUDA, the one-layer modules took its tensors into buffers of their own
            module.flatten_parameters()
        with deferred_cache():  # its cache fills on first use, not while the others exist
            ref = converted(module, self._qdict(info.tensor_names)).train(False)
        if self.codes:  # GPTQ's codes, which rounding the float weights would not give
            ref.set_quantized_weights(self.codes)  # type: ignore[operator]
        check_readable(ref, info.float_type)
        self.result.reference = ref
        row["reference_type"] = ref._get_name()
        if not measure:
            row["probe"] = "none"
            return row
        row["probe"] = "random" if given is None else "calibration"
        check_finite(runs, row["path"], given is not None)
        row.update(calls_result(runs["float"], runs["quantized"], probe_shape(module, calls)))
        if given is not None:
            row["calibration"] = calibration_result(fit, runs, finals)
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

    def _quantize(
        self, name: str, hessian: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Observe, quantize and measure one weight; write its codes and parameters; return
        its fake-quantized values, and those of rounding to nearest with the same scales
        (None, None with ``probe_steps: 0``, where no reference layer runs).
        ``hessian``: ``XᵀX`` of its calibration inputs, for the weights whose spec asks for them."""
        weight = getattr(self.result.float_module, name).detach()
        spec = self.plan.weights[name]
        where = f"{display_path(self.info.path)}.{name}"
        if weight.numel() and not all(math.isfinite(v) for v in torch.aminmax(weight)):
            raise CheckpointError(f"{self.checkpoint.path}: {where} holds NaN or infinite values")
        qp = self.result.qparams[name] = observe(weight, spec, where, hessian)
        grid = None
        if spec.rounding == "gptq":
            try:
                grid = gptq_values(weight, qp, hessian, where=where)  # type: ignore[arg-type]
            except QParamsError as exc:
                raise spec.error(exc, where) from None
        key = self.info.key(name)
        self.writer.begin(key, qp.storage, tuple(weight.shape))
        blocks: list[torch.Tensor] = []

        def write(codes: torch.Tensor) -> None:
            self.writer.write(codes)
            if grid is not None:
                blocks.append(codes.clone())

        measure = not self.probe.off  # else no reference layer runs: no values to keep
        out = None
        if measure:
            spare = self.spare.get((weight.shape, weight.dtype))
            out = (
                spare.pop()
                if spare
                else torch.empty_like(weight, memory_format=torch.contiguous_format)
            )
            self.lent.append(out)
        values, stats = quantize_and_measure(
            weight, qp, self.decomposed, write, grid=grid, values=measure, out=out
        )
        self.writer.end()
        self.writer.add(key + "_scale", qp.scale)
        self.writer.add(key + "_zero_point", qp.zero_point)
        nearest = values
        if grid is not None:
            self.codes[name] = torch.cat(blocks).reshape(weight.shape)
            if measure:
                nearest = fake_quantize(weight, qp, decomposed=self.decomposed)
        self.weight_rows.append(
            {
                "module": display_path(self.info.path),
                "weight": name,
                "observer": spec.observer,
                **stats,
                "qscheme": spec.qscheme,  # as the spec says it, not as stored
                **({"rounding": spec.rounding} if spec.rounding != "nearest" else {}),
            }
        )
        return values, nearest


def _layer_call(call: Call, x: torch.Tensor, layer: int | None, directions: int) -> Call:
    """``call`` as layer ``layer`` of its module sees it: input ``x``, the layer's states."""

    def part(state: torch.Tensor | None) -> torch.Tensor | None:
        if state is None or layer is None:
            return state
        return state[layer * directions : (layer + 1) * directions]

    return Call(x, part(call.h_0), part(call.c_0))


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
