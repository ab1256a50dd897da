"""The conversion report: per-weight error, per-module output error on a probe, totals.

:mod:`refq_cli.quant.statistics` and :mod:`refq_cli.pipeline.probe` compute its numbers;
``to_markdown`` renders it. The JSON report is the plain data; both are deterministic for the
same input, spec and probe.
"""

from __future__ import annotations

import json
from typing import Any

from refq_cli.errors import markdown_cell, printable
from refq_cli.kinds import display_path


def _fmt(value: Any) -> str:
    if value is None:
        return "exact"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def to_markdown(report: dict[str, Any]) -> str:
    """The report for people and CI step summaries."""
    source = report["source"]
    totals = report["totals"]
    lines = [
        f"# refq conversion report: {printable(source['name'])}",
        "",
        f"- source sha256: `{source['sha256']}` ({source['format']})",
        f"- spec: `{printable(report['spec'])}`",
        f"- bytes: {totals['float_bytes']:,} float -> {totals['quantized_bytes']:,} quantized "
        f"({totals['compression_ratio']:.2f}x smaller)",
        f"- worst weight SQNR: {_fmt(totals['worst_sqnr_db'])} dB over "
        f"{totals['weights_quantized']} quantized weights",
        f"- conversion time: {totals['seconds']:.2f} s",
        *_assumed_lines(report.get("assumed_facts") or {}),
        "",
        "## Weights",
        "",
        "| module | weight | shape | qscheme | dtype | scale | zero point | SQNR dB | "
        "max abs err | clipped |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for w in report["weights"]:
        scale = _range(w["scale_min"], w["scale_max"])
        zp = _range(w["zero_point_min"], w["zero_point_max"])
        lines.append(
            f"| {markdown_cell(display_path(w['module']))} | {w['weight']} | "
            f"{'x'.join(map(str, w['shape']))} | "
            f"{w['qscheme']} | {w['dtype']} | {scale} | {zp} | {_fmt(w['sqnr_db'])} | "
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
            lines.append(
                f"| {markdown_cell(display_path(m['path']))} | {m['float_type']} | kept float "
                "| | | |"
            )
            continue
        lines.append(
            f"| {markdown_cell(display_path(m['path']))} | {m['float_type']} | "
            f"{m['reference_type']} | "
            f"{_fmt(m['output_sqnr_db'])} | {_fmt(m['output_max_abs_error'])} | "
            f"{_fmt(m['hidden_error_per_step'][-1])} |"
        )
    return "\n".join(lines) + "\n"


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
