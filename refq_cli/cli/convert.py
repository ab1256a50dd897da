"""``refq convert``: checkpoints + spec -> artifacts + reports.

One input prints its conversion in detail; several inputs (or any batch option) run as jobs,
one line each, through the same runner as ``refq batch``.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Any

import typer

from refq_cli.cli.options import (
    Device,
    FailFast,
    Force,
    JsonOutput,
    ListJobs,
    ProbeSequences,
    ProbeSteps,
    Quiet,
    Shard,
    SkipUnchanged,
    StripPrefix,
    SummaryMarkdown,
    TrustCode,
    Workers,
)
from refq_cli.cli.runner import run_batch
from refq_cli.errors import (
    ConversionError,
    RefqError,
    RefqWarning,
    plural,
    printable,
    strict_json,
)
from refq_cli.pipeline.gate import checked_min_sqnr


def convert_command(
    inputs: Annotated[
        list[Path],
        typer.Argument(
            help="Checkpoints (paths or globs): state_dicts (.pt, .pth, .bin), "
            ".safetensors files or TorchScript archives.",
            show_default=False,
            metavar="CHECKPOINT",
        ),
    ],
    qconfig: Annotated[
        Path,
        typer.Option(
            "--qconfig", "-q", help="The YAML spec (see `refq schema`).", show_default=False
        ),
    ],
    output: Annotated[
        str | None,
        typer.Option(
            "--output",
            "-o",
            help="Artifact path, for one input \\[default: CHECKPOINT stem + .refq.safetensors]",
            show_default=False,
            metavar="<path>",  # taken as text: a trailing / must reach file_argument
        ),
    ] = None,
    out_dir: Annotated[
        Path | None,
        typer.Option(
            "--out-dir",
            help="Folder for the artifacts, named after their inputs; a glob's matches keep "
            "their folders below the glob's fixed part ('models/**/*.pt': models/a/x.pt -> "
            "OUT/a/x.refq.safetensors) \\[default: beside each input]",
            show_default=False,
        ),
    ] = None,
    root: Annotated[
        Path | None,
        typer.Option(
            "--root",
            help="With --out-dir: mirror every input's folder relative to this folder instead "
            "(inputs must lie inside it) \\[default: a glob's fixed part; a path given alone "
            "goes into --out-dir itself]",
            show_default=False,
        ),
    ] = None,
    report: Annotated[
        str | None,
        typer.Option(
            "--report",
            help="Report JSON path, for one input; the Markdown report "
            "goes beside it with .md \\[default: beside the artifact]",
            show_default=False,
            metavar="<path>",
        ),
    ] = None,
    calibration: Annotated[
        Path | None,
        typer.Option(
            "--calibration",
            help="Calibration inputs, recorded with refq_cli.record_calibration (or "
            "(time, batch, features) tensors, (batch, time, features) for batch_first "
            "modules, named by module path, <root> at the root): the report's probe, and "
            "what observer output and rounding gptq fit on.",
            show_default=False,
        ),
    ] = None,
    min_sqnr: Annotated[
        float | None,
        typer.Option(
            "--min-sqnr",
            help="Quality gate: exit 1 when a weight's SQNR (dB) is below this; the artifact "
            "and its reports then go beside their places, named NAME.rejected.EXT "
            "(m.refq.rejected.safetensors), never in the place of an accepted one. The gate "
            "and its result are recorded in the artifact and the report.",
            show_default=False,
        ),
    ] = None,
    strip_prefix: StripPrefix = None,
    probe_steps: ProbeSteps = None,
    probe_sequences: ProbeSequences = None,
    device: Device = "cpu",
    force: Force = False,
    trust_code: TrustCode = False,
    workers: Workers = 1,
    shard: Shard = None,
    list_jobs: ListJobs = False,
    skip_unchanged: SkipUnchanged = False,
    fail_fast: FailFast = False,
    summary_md: SummaryMarkdown = None,
    json_output: JsonOutput = False,
    quiet: Quiet = False,
) -> None:
    """Convert float checkpoints into reference-quantized artifacts and reports."""
    from refq_cli.pipeline.jobs import (
        Job,
        Options,
        check_device,
        check_root,
        file_argument,
        find_inputs,
        normalized,
        out_folder,
        output_paths,
    )
    from refq_cli.spec.spec import check_probe_setting

    min_sqnr = checked_min_sqnr(min_sqnr)
    if root is not None and out_dir is None:
        raise RefqError("--root says where under --out-dir the artifacts go; give --out-dir too")
    found = find_inputs(str(p) for p in inputs)
    if len(found) > 1 and (output is not None or report is not None):
        raise RefqError("--output and --report name one file; with several inputs use --out-dir")
    if output is not None and (out_dir is not None or root is not None):
        raise RefqError("--output names the artifact itself; give --out-dir (and --root) or it")
    check_device(device)
    output, report = (
        None if p is None else file_argument(name, p)
        for name, p in (("output", output), ("report", report))
    )
    output, out_dir, report, calibration = (
        None if p is None else normalized(p) for p in (output, out_dir, report, calibration)
    )
    root = None if root is None else check_root(root, f"--root {root}")
    jobs = [
        Job(
            item.path,
            normalized(qconfig),
            *output_paths(item.path, output, out_folder(out_dir, item, root), report),
            calibration,
            min_sqnr,
        )
        for item in found
    ]
    check_probe_setting(probe_steps, probe_sequences)
    options = Options(
        force,
        skip_unchanged,
        device,
        trust_code,
        strip_prefix,
        probe_steps=probe_steps,
        probe_sequences=probe_sequences,
    )
    batch = (
        len(jobs) > 1
        or out_dir is not None
        or shard is not None
        or list_jobs
        or skip_unchanged
        or workers != 1
        or fail_fast
        or summary_md is not None
    )
    if batch:
        run_batch(
            jobs,
            options,
            shard=shard,
            list_jobs=list_jobs,
            workers=workers,
            fail_fast=fail_fast,
            summary_md=summary_md,
            json_output=json_output,
            quiet=quiet,
        )
    else:
        _convert_one(jobs[0], options, json_output=json_output, quiet=quiet)


def _convert_one(job: Any, options: Any, *, json_output: bool, quiet: bool) -> None:
    """``refq_cli.convert`` on the one job, with a progress bar, its summary and its error."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from refq_cli.pipeline.api import convert
    from refq_cli.pipeline.batch import JobResult, converted_result
    from refq_cli.pipeline.summary import run_summary

    stderr = Console(stderr=True)
    show_progress = not quiet and not json_output and stderr.is_terminal
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        console=stderr,
        transient=True,
    )
    task = bar.add_task("reading", total=None)
    try:
        with bar if show_progress else nullcontext(), warnings.catch_warnings():
            warnings.simplefilter("ignore", RefqWarning)  # said below, as a line of refq's own
            report = convert(
                job.input,
                job.spec,
                job.output,
                report=job.report,
                calibration=job.calibration,
                min_sqnr=job.min_sqnr,
                strip_prefix=options.strip_prefix,
                probe_steps=options.probe_steps,
                probe_sequences=options.probe_sequences,
                force=options.force,
                device=options.device,
                trust_code=options.trust_code,
                progress=lambda what, done, total: bar.update(
                    task, description=what, completed=done, total=total
                ),
            ).report
    except RefqError as exc:  # the one record --json promises, then the error and its code
        if json_output:
            failed = JobResult.of(job, "failed", error=str(exc), exit_code=exc.exit_code)
            typer.echo(strict_json(run_summary([failed])))
        raise
    result = converted_result(job, report)
    if result.warning and not quiet:
        typer.echo(f"refq: warning: {printable(result.warning)}", err=True)
    if json_output:
        typer.echo(strict_json(run_summary([result])))
    elif not quiet:
        _print_summary(result, report["totals"])
    if result.error:
        raise ConversionError(
            f"quality gate: {result.error}; the artifact and its reports were set aside as "
            f"{result.output}, {result.report_json} and {result.report_md}"
        )


def _print_summary(result: Any, totals: dict[str, Any]) -> None:
    worst = totals["worst_sqnr_db"]
    worst_text = "exact" if worst is None else f"{worst:.1f} dB"
    typer.echo(
        printable(
            f"{result.input} -> {result.output}: {plural(totals['weights_quantized'], 'weight')} "
            f"quantized, worst SQNR {worst_text}, {totals['float_bytes']:,} -> "
            f"{totals['quantized_bytes']:,} bytes ({totals['compression_ratio']:.2f}x), "
            f"{result.seconds:.2f} s"
        )
    )
    typer.echo(printable(f"report: {result.report_md} and {result.report_json}"))
