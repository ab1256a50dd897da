"""``refq batch``: the jobs of a manifest; and the batch runner ``refq convert`` shares."""

from __future__ import annotations

from collections.abc import Sequence
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
    Quiet,
    Shard,
    SkipUnchanged,
    SummaryMarkdown,
    TrustCode,
    Workers,
)
from refq_cli.errors import ConversionError, RefqError, printable, strict_json


def batch_command(
    manifest: Annotated[
        Path,
        typer.Argument(help="The YAML manifest of jobs.", show_default=False, metavar="MANIFEST"),
    ],
    shard: Shard = None,
    list_jobs: ListJobs = False,
    workers: Workers = 1,
    skip_unchanged: SkipUnchanged = False,
    fail_fast: FailFast = False,
    summary_md: SummaryMarkdown = None,
    device: Device = "cpu",
    force: Force = False,
    trust_code: TrustCode = False,
    json_output: JsonOutput = False,
    quiet: Quiet = False,
) -> None:
    """Run the conversion jobs a manifest lists (one shard of them with --shard)."""
    from refq_cli.pipeline.batch import Options
    from refq_cli.pipeline.manifest import load_manifest

    run_batch(
        load_manifest(manifest),
        Options(force, skip_unchanged, device, trust_code),
        inputs=[("manifest", manifest)],
        shard=shard,
        list_jobs=list_jobs,
        workers=workers,
        fail_fast=fail_fast,
        summary_md=summary_md,
        json_output=json_output,
        quiet=quiet,
    )


def run_batch(
    jobs: Sequence[Any],
    options: Any,
    *,
    shard: str | None,
    list_jobs: bool,
    workers: int,
    fail_fast: bool,
    summary_md: Path | None,
    json_output: bool,
    quiet: bool,
    inputs: Sequence[tuple[str, Path]] = (),
) -> None:
    """Shard, list or run jobs; print a line per job (or a progress bar), then the summaries.
    ``inputs`` are files of the run besides the jobs' own (the manifest): no output replaces
    them."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from refq_cli.io.outputs import write_file
    from refq_cli.pipeline.batch import (
        JobResult,
        check_jobs,
        check_run,
        is_summary,
        parse_shard,
        run_jobs,
        run_summary,
        select_shard,
        summary_markdown,
        totals_line,
    )

    if workers < 1:
        raise RefqError(f"--jobs {workers}: give at least 1")
    check_jobs(jobs)
    if shard is not None:
        jobs = select_shard(jobs, *parse_shard(shard))
    if list_jobs:
        if json_output:
            typer.echo(strict_json(run_summary([JobResult.of(j, "listed") for j in jobs])))
        else:
            for j in jobs:
                typer.echo(printable(f"{j.input} -> {j.output} ({j.spec})"))
        return

    for job in jobs:  # batch outputs go to folders made for them (--out-dir, out_dir:)
        for folder in {job.output.parent, job.report.parent}:
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except FileExistsError:
                raise RefqError(f"{folder}: is not a folder; give a folder for outputs") from None
            except OSError as exc:
                raise RefqError(
                    f"{folder}: cannot create the output folder: {exc.strerror or exc}"
                ) from None
    options = check_run(jobs, options, summary=summary_md, inputs=inputs)
    console = Console(stderr=json_output)
    show_bar = console.is_terminal and not quiet and not json_output
    bar = Progress(
        TextColumn("converting"), BarColumn(), MofNCompleteColumn(), console=console, transient=True
    )
    task = bar.add_task("jobs", total=len(jobs))

    def report(result: Any) -> None:
        bar.advance(task)
        if json_output or (quiet and result.exit_code == 0):
            return
        line = f"{result.status.replace('_', ' ').upper():9} {result.input}"
        if result.status in ("converted", "gate"):
            sqnr = result.worst_sqnr_db
            line += (
                f" -> {result.output} (worst SQNR "
                f"{'exact' if sqnr is None else f'{sqnr:.1f} dB'}, {result.seconds:.2f} s)"
            )
        if result.error:
            line += f": {result.error}"
        console.print(printable(line), highlight=False, markup=False, soft_wrap=True)

    with bar if show_bar else nullcontext():
        results = run_jobs(jobs, options, workers=workers, fail_fast=fail_fast, on_result=report)
    if summary_md is not None:
        write_file(
            summary_md,
            summary_markdown(results).encode(),
            inputs=options.protected,
            force=options.force,
            flag="--summary-md",
            replaceable=is_summary,
        )
    if json_output:
        typer.echo(strict_json(run_summary(results)))
    elif not quiet:
        console.print(totals_line(results), highlight=False)
    failed = [r for r in results if r.exit_code != 0]
    if failed:
        raise ConversionError(
            f"{len(failed)} of {len(results)} job(s) failed or missed their gate: "
            + ", ".join(r.input for r in failed[:5])
            + (", ..." if len(failed) > 5 else "")
        )
