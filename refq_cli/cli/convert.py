"""``refq convert``: checkpoint + spec -> artifact + report."""

from __future__ import annotations

import json
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated

import typer

from refq_cli.cli.options import Checkpoint, Device, Force, JsonOutput, Quiet, TrustPickle
from refq_cli.errors import ConversionError, RefqError


def default_paths(input_path: Path, output: Path | None, report: Path | None) -> tuple[Path, ...]:
    """(artifact, report JSON, report Markdown) paths, defaults derived from the input's name."""
    artifact = output or input_path.with_name(input_path.stem + ".refq.safetensors")
    if report is None:
        stem = artifact.name.removesuffix(".safetensors")
        report = artifact.with_name(stem + ".report.json")
    elif report.suffix == ".md":
        raise RefqError(
            f"--report {report}: give the JSON path; the Markdown report is written "
            "beside it with .md"
        )
    return artifact, report, report.with_suffix(".md")


def convert_command(
    input_path: Checkpoint,
    qconfig: Annotated[
        Path,
        typer.Option(
            "--qconfig", "-q", help="The YAML spec (see `refq schema`).", show_default=False
        ),
    ],
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Artifact path \\[default: CHECKPOINT stem + .refq.safetensors]",
            show_default=False,
        ),
    ] = None,
    report: Annotated[
        Path | None,
        typer.Option(
            "--report",
            help="Report JSON path; the Markdown report goes beside it "
            "with .md \\[default: beside the artifact]",
            show_default=False,
        ),
    ] = None,
    calibration: Annotated[
        Path | None,
        typer.Option(
            "--calibration",
            help="Probe inputs: a state_dict or .safetensors file "
            "of (time, batch, features) tensors ((batch, time, features) for batch_first "
            "modules) named by module path (<root> for a module at the root).",
            show_default=False,
        ),
    ] = None,
    min_sqnr: Annotated[
        float | None,
        typer.Option(
            "--min-sqnr",
            help="Quality gate: exit 1 when a weight's SQNR (dB) is below this.",
            show_default=False,
        ),
    ] = None,
    device: Device = "cpu",
    force: Force = False,
    trust_pickle: TrustPickle = False,
    json_output: JsonOutput = False,
    quiet: Quiet = False,
) -> None:
    """Convert a float checkpoint into a reference-quantized artifact and a report."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from refq_cli.artifact import check_outputs, save_artifact, write_atomic
    from refq_cli.convert import convert
    from refq_cli.report import to_markdown

    started = time.perf_counter()
    if min_sqnr is not None and not math.isfinite(min_sqnr):
        raise RefqError(f"--min-sqnr {min_sqnr}: give a finite number of dB")
    artifact_path, report_json, report_md = default_paths(input_path, output, report)
    inputs = {"input": input_path, "spec": qconfig}
    if calibration is not None:
        inputs["calibration file"] = calibration
    outputs = {"--output": artifact_path, "--report": report_json, "the Markdown report": report_md}
    check_outputs(outputs, inputs, force=force)

    stderr = Console(stderr=True)
    show_progress = not quiet and not json_output and stderr.is_terminal
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        console=stderr,
        transient=True,
    )
    with bar if show_progress else nullcontext():
        task = bar.add_task("reading", total=None)
        conversion = convert(
            input_path,
            qconfig,
            device=device,
            trust_pickle=trust_pickle,
            calibration=calibration,
            progress=lambda what, done, total: bar.update(
                task, description=what, completed=done, total=total
            ),
        )
        bar.update(task, description="writing")
        save_artifact(artifact_path, conversion.tensors(), conversion.metadata(), force=force)
        report_text = json.dumps(conversion.report, indent=2, sort_keys=True) + "\n"
        write_atomic(report_json, lambda p: p.write_text(report_text), force=force)
        markdown = to_markdown(conversion.report)
        write_atomic(report_md, lambda p: p.write_text(markdown), force=force)
    seconds = time.perf_counter() - started

    failing = conversion.below(min_sqnr) if min_sqnr is not None else []
    summary = {
        "input": str(input_path),
        "output": str(artifact_path),
        "report_json": str(report_json),
        "report_md": str(report_md),
        "seconds": round(seconds, 3),
        "totals": conversion.report["totals"],
        "modules": [
            {k: m.get(k) for k in ("path", "float_type", "skipped", "output_sqnr_db")}
            for m in conversion.report["modules"]
        ],
        "below_min_sqnr": failing,
    }
    if json_output:
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    elif not quiet:
        _print_summary(summary)
    if failing:
        raise ConversionError(
            f"quality gate: {len(failing)} weight(s) below --min-sqnr {min_sqnr:g} dB: "
            + ", ".join(failing)
        )


def _print_summary(summary: dict) -> None:
    totals = summary["totals"]
    worst = totals["worst_sqnr_db"]
    worst_text = "exact" if worst is None else f"{worst:.1f} dB"
    typer.echo(
        f"{summary['input']} -> {summary['output']}: {totals['weights_quantized']} weights "
        f"quantized, worst SQNR {worst_text}, {totals['float_bytes']:,} -> "
        f"{totals['quantized_bytes']:,} bytes ({totals['compression_ratio']:.2f}x), "
        f"{summary['seconds']:.2f} s"
    )
    typer.echo(f"report: {summary['report_md']} and {summary['report_json']}")
