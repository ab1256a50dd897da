"""Option types shared by several commands, defined once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

Force = Annotated[bool, typer.Option("--force", help="Overwrite outputs that exist.")]
Quiet = Annotated[bool, typer.Option("--quiet", help="Print nothing but errors (for CI logs).")]
JsonOutput = Annotated[
    bool, typer.Option("--json", help="Print a JSON summary on stdout, for scripts.")
]
TrustCode = Annotated[
    bool,
    typer.Option(
        "--trust-code",
        "--trust-pickle",
        help="This file may run code: unpickle Python objects (a whole nn.Module) and load "
        "TorchScript with torch.jit.load. Only for files you trust; without it, refq reads "
        "them without running anything, or refuses them. --trust-pickle is the old name.",
    ),
]
Device = Annotated[
    str, typer.Option("--device", help="Device for observers and probes: cpu or cuda.")
]
Checkpoint = Annotated[
    Path,
    typer.Argument(
        help="Checkpoint: a state_dict (.pt, .pth, .bin), a .safetensors file or a TorchScript "
        "archive.",
        show_default=False,
        metavar="CHECKPOINT",
    ),
]
Shard = Annotated[
    str | None,
    typer.Option(
        "--shard",
        help="Run shard K of N (K/N, 1 <= K <= N): a fixed partition of the "
        "jobs, the same on every machine.",
        show_default=False,
    ),
]
ListJobs = Annotated[
    bool, typer.Option("--list", help="Print the jobs that would run, and run none.")
]
Workers = Annotated[
    int, typer.Option("--jobs", help="Worker processes, each converting whole files.")
]
SkipUnchanged = Annotated[
    bool,
    typer.Option(
        "--skip-unchanged",
        help="Skip a job whose artifact already records the same "
        "input sha256, spec and format version.",
    ),
]
FailFast = Annotated[bool, typer.Option("--fail-fast", help="Stop at the first failed job.")]
SummaryMarkdown = Annotated[
    Path | None,
    typer.Option(
        "--summary-md",
        help="Write a Markdown table of the jobs here (for a CI step summary). It replaces "
        "a summary refq wrote before; any other file only with --force.",
        show_default=False,
    ),
]
