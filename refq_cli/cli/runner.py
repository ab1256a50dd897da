"""Running jobs from the command line, for ``refq convert`` (several inputs, or any batch
option) and ``refq batch``: a line per job (or a progress bar), then the totals, the ``--json``
output and the ``--summary-md`` table. The work is :mod:`refq_cli.pipeline.batch`'s."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import typer

from refq_cli.errors import ConversionError, RefqError, printable, strict_json


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
    from refq_cli.pipeline.batch import JobResult, prepare_run, run_jobs, shard_jobs
    from refq_cli.pipeline.jobs import is_summary
    from refq_cli.pipeline.shards import parse_shard
    from refq_cli.pipeline.summary import run_summary, summary_markdown, totals_line

    if workers < 1:
        raise RefqError(f"--jobs {workers}: give at least 1")
    part = parse_shard(shard) if shard is not None else None
    if list_jobs:
        jobs = shard_jobs(jobs, part, options.strip_prefix)
        if json_output:
            typer.echo(strict_json(run_summary([JobResult.of(j, "listed") for j in jobs])))
        else:
            for j in jobs:
                typer.echo(printable(f"{j.input} -> {j.output} ({j.spec})"))
        return
    jobs, options = prepare_run(jobs, options, shard=part, summary=summary_md, inputs=inputs)
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
        if result.warning and not quiet:
            typer.echo(f"refq: warning: {printable(result.warning)}", err=True)

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
