"""``refq batch``: the jobs of a manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

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
    strip_prefix: StripPrefix = None,
    probe_steps: ProbeSteps = None,
    probe_sequences: ProbeSequences = None,
    device: Device = "cpu",
    force: Force = False,
    trust_code: TrustCode = False,
    json_output: JsonOutput = False,
    quiet: Quiet = False,
) -> None:
    """Run the conversion jobs a manifest lists (one shard of them with --shard)."""
    from refq_cli.cli.runner import run_batch
    from refq_cli.pipeline.jobs import Options, check_device
    from refq_cli.pipeline.manifest import load_manifest
    from refq_cli.spec.spec import check_probe_setting

    check_probe_setting(probe_steps, probe_sequences)

    run_batch(
        load_manifest(manifest),
        Options(
            force,
            skip_unchanged,
            check_device(device),
            trust_code,
            strip_prefix,
            probe_steps=probe_steps,
            probe_sequences=probe_sequences,
        ),
        inputs=[("manifest", manifest)],
        shard=shard,
        list_jobs=list_jobs,
        workers=workers,
        fail_fast=fail_fast,
        summary_md=summary_md,
        json_output=json_output,
        quiet=quiet,
    )
