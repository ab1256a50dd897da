"""The conversion report: per-weight error, per-module output error on a probe, totals.

:mod:`refq_cli.quant.statistics` and :mod:`refq_cli.pipeline.probe` compute its numbers;
``to_markdown`` renders it. The JSON report is the plain data; both are deterministic for the
same input, spec and probe.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, NotRequired, TypedDict

from refq_cli import __version__
from refq_cli.errors import markdown_cell, plural, printable
from refq_cli.pipeline.calibration import HELD_OUT_EVERY
from refq_cli.pipeline.gate import GateRecord, gate_line
from refq_cli.pipeline.probe import CalibrationPart, CalibrationResult, ProbeResult
from refq_cli.quant.statistics import WeightStats


class ShardSource(TypedDict):
    name: str
    sha256: str


class Source(TypedDict):
    """The checkpoint a conversion read (also the artifact's ``refq.source``); for a sharded
    checkpoint, its index's name and sha256, and every shard's."""

    name: str
    sha256: str
    format: str  # state_dict | safetensors | torchscript | pickle
    shards: NotRequired[list[ShardSource]]


class WeightRow(WeightStats):
    """A quantized weight of the report."""

    module: str  # the module's name (kinds.display_path: <root> at the root)
    weight: str
    observer: str
    rounding: NotRequired[str]  # gptq; absent for rounding to nearest


class _ModuleRowBase(TypedDict):
    path: str  # the module's name (<root> at the root)
    float_type: str
    skipped: bool


class ModuleRow(_ModuleRowBase, ProbeResult, total=False):
    """A recurrent module of the report; a skipped one (kept float) has only the three keys
    above, a converted one its reference type and its probe's result too."""

    reference_type: str
    probe: str  # random | calibration | none (probe_steps 0: no ProbeResult keys)
    calibration: CalibrationResult  # with calibration inputs: the error on fit and held-out parts


class Totals(TypedDict):
    float_bytes: int
    quantized_bytes: int
    compression_ratio: float
    weights_quantized: int
    worst_sqnr_db: float | None
    seconds: float


class _ReportBase(TypedDict):
    refq_version: str
    source: Source
    spec: str  # the spec file's name
    weights: list[WeightRow]
    modules: list[ModuleRow]
    totals: Totals
    assumed_facts: dict[str, dict[str, Any]]  # by module: facts assumed with their defaults


class Report(_ReportBase, total=False):
    """The conversion report, as its JSON file holds it."""

    gate: GateRecord  # with a --min-sqnr


def build_report(
    checkpoint: Any,
    spec_name: str,
    weights: Sequence[WeightRow],
    modules: Sequence[ModuleRow],
    quantized_bytes: int,
    assumed_facts: dict[str, dict[str, Any]],
    *,
    seconds: float,
) -> Report:
    """The report of a conversion of ``checkpoint`` (a ``refq_cli.io.checkpoint.Checkpoint``)."""
    float_bytes = sum(t.numel() * t.element_size() for t in checkpoint.tensors.values())
    sqnrs = [w["sqnr_db"] for w in weights if w["sqnr_db"] is not None]
    return {
        "refq_version": __version__,
        "source": checkpoint.source,
        "spec": spec_name,
        "weights": list(weights),
        "modules": list(modules),
        "totals": {
            "float_bytes": float_bytes,
            "quantized_bytes": quantized_bytes,
            "compression_ratio": float_bytes / quantized_bytes if quantized_bytes else 0.0,
            "weights_quantized": len(weights),
            "worst_sqnr_db": min(sqnrs) if sqnrs else None,
            "seconds": seconds,
        },
        "assumed_facts": assumed_facts,
    }


def assumed_facts_warning(report: Mapping[str, Any]) -> str | None:
    """One line naming each assumed fact and the spec key that sets it, or None."""
    assumed = report.get("assumed_facts") or {}
    if not assumed:
        return None
    named = ", ".join(
        f"modules.{path}.{fact}: {json.dumps(value)}"
        for path, facts in assumed.items()
        for fact, value in facts.items()
    )
    return (
        f"{report['source']['name']}: weights cannot tell these facts, so PyTorch's defaults "
        f"were assumed; set them in the spec if the model differs: {named}"
    )


def _fmt(value: Any) -> str:
    if value is None:
        return "exact"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def to_markdown(report: Report) -> str:
    """The report for people and CI step summaries."""
    source = report["source"]
    totals = report["totals"]
    lines = [
        f"# refq conversion report: {printable(source['name'])}",
        "",
        f"- source sha256: `{source['sha256']}` ({source['format']})",
        *(
            f"- shard `{printable(shard['name'])}`: sha256 `{shard['sha256']}`"
            for shard in source.get("shards", [])
        ),
        f"- spec: `{printable(report['spec'])}`",
        f"- bytes: {totals['float_bytes']:,} float -> {totals['quantized_bytes']:,} quantized "
        f"({totals['compression_ratio']:.2f}x smaller)",
        f"- worst weight SQNR: {_fmt(totals['worst_sqnr_db'])} dB over "
        f"{plural(totals['weights_quantized'], 'quantized weight')}",
        f"- conversion time: {totals['seconds']:.2f} s",
        *_assumed_lines(report.get("assumed_facts") or {}),
        "",
        "## Weights",
        "",
        "| module | weight | shape | qscheme | dtype | observer | scale | zero point | SQNR dB | "
        "max abs err | clipped |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for w in report["weights"]:
        scale = _range(w["scale_min"], w["scale_max"])
        zp = _range(w["zero_point_min"], w["zero_point_max"])
        lines.append(
            f"| {markdown_cell(w['module'])} | {w['weight']} | "
            f"{'x'.join(map(str, w['shape']))} | "
            f"{w['qscheme']} | {w['dtype']} | {w['observer']}"
            f"{' + ' + w['rounding'] if 'rounding' in w else ''} | {scale} | {zp} | "
            f"{_fmt(w['sqnr_db'])} | "
            f"{_fmt(w['max_abs_error'])} | {w['clipped_fraction']:.2%} |"
        )
    lines += [
        "",
        "## Modules (probe input)",
        "",
        "| module | float | reference | output SQNR dB | max abs err | error at last step |",
        "|---|---|---|---|---|---|",
    ]
    for m in report["modules"]:
        if m["skipped"]:
            lines.append(f"| {markdown_cell(m['path'])} | {m['float_type']} | kept float | | | |")
            continue
        if m["probe"] == "none":
            lines.append(
                f"| {markdown_cell(m['path'])} | {m['float_type']} | {m['reference_type']} | "
                "not measured (probe_steps: 0) | | |"
            )
            continue
        lines.append(
            f"| {markdown_cell(m['path'])} | {m['float_type']} | "
            f"{m['reference_type']} | "
            f"{_fmt(m['output_sqnr_db'])} | {_fmt(m['output_max_abs_error'])} | "
            f"{_fmt(m['hidden_error_per_step'][-1])} |"
        )
    lines += _calibration_lines(report["modules"])
    if "gate" in report:
        lines += ["", gate_line(report["gate"])]
    return "\n".join(lines) + "\n"


def _calibration_lines(modules: Sequence[ModuleRow]) -> list[str]:
    """Per module with calibration inputs: its output and final-state SQNR on the sequences
    the Hessians came from and on those held out, and nearest rounding's beside GPTQ's."""
    calibrated = [m for m in modules if "calibration" in m]
    if not calibrated:
        return []
    lines = [
        "",
        f"## Calibration inputs (SQNR dB; held out: every {HELD_OUT_EVERY}th sequence, not "
        "fitted on)",
        "",
        "| module | part | sequences | output | hidden state | nearest: output | "
        "nearest: hidden state |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in calibrated:
        parts: list[tuple[str, CalibrationPart | None]] = [
            ("fit", m["calibration"]["fit"]),
            ("held out", m["calibration"]["held_out"]),
        ]
        for name, part in parts:
            if part is None:
                lines.append(f"| {markdown_cell(m['path'])} | {name} | 0 | | | | |")
                continue
            cells = [
                _fmt(part[key]) if key in part else ""  # type: ignore[literal-required]
                for key in (
                    "output_sqnr_db",
                    "hidden_sqnr_db",
                    "nearest_output_sqnr_db",
                    "nearest_hidden_sqnr_db",
                )
            ]
            lines.append(
                f"| {markdown_cell(m['path'])} | {name} | {part['sequences']} | "
                + " | ".join(cells)
                + " |"
            )
    return lines


def _assumed_lines(assumed: dict[str, dict[str, Any]]) -> list[str]:
    """The facts weights cannot tell that were assumed, and where the spec sets them."""
    if not assumed:
        return []
    named = "; ".join(  # sorted, as the report's JSON is
        f"{printable(path)}: " + ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(facts.items()))
        for path, facts in sorted(assumed.items())
    )
    return [f"- assumed, as weights cannot tell (set them under `modules:` in the spec): {named}"]


def _range(lo: Any, hi: Any) -> str:
    return _fmt(lo) if lo == hi else f"{_fmt(lo)} .. {_fmt(hi)}"
