"""Option types shared by several commands, defined once.

A switch (an option that takes no value) is made with :func:`flag`: the help then shows no
type beside it (Typer's type column would say ``<bool>``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer


def flag(*names: str, help: str, **settings: Any) -> Any:
    """``typer.Option`` for a switch: no type in the help's type column (a switch takes no
    value, so there is none to show)."""
    return typer.Option(*names, help=help, metavar="", **settings)


def _show_help(ctx: typer.Context, value: bool) -> None:
    """What click's own --help does: print the help of the command and exit 0."""
    if value and not ctx.resilient_parsing:
        typer.echo(ctx.get_help(), color=ctx.color)
        raise typer.Exit()


def eager_flag(*names: str, help: str, callback: Callable[..., Any]) -> Any:
    """A switch that acts at once (``--help``, ``--version``), before any other option is
    checked; it passes no value to the command."""
    return flag(*names, help=help, callback=callback, is_eager=True, expose_value=False)


# refq's --help, in place of click's (whose type column says <bool>): the app and its commands
# are made with add_help_option=False and take this option instead (cli/app.py).
Help = Annotated[
    bool, eager_flag("--help", help="Show this message and exit.", callback=_show_help)
]

Force = Annotated[bool, flag("--force", help="Overwrite outputs that exist.")]
Quiet = Annotated[bool, flag("--quiet", help="Print nothing but errors (for CI logs).")]
JsonOutput = Annotated[bool, flag("--json", help="Print a JSON summary on stdout, for scripts.")]
TrustCode = Annotated[
    bool,
    flag(
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
ListJobs = Annotated[bool, flag("--list", help="Print the jobs that would run, and run none.")]
Workers = Annotated[
    int, typer.Option("--jobs", help="Worker processes, each converting whole files.")
]
SkipUnchanged = Annotated[
    bool,
    flag(
        "--skip-unchanged",
        help="Skip a job whose artifact already records the same "
        "input sha256, spec and format version.",
    ),
]
FailFast = Annotated[bool, flag("--fail-fast", help="Stop at the first failed job.")]
SummaryMarkdown = Annotated[
    Path | None,
    typer.Option(
        "--summary-md",
        help="Write a Markdown table of the jobs here (for a CI step summary). It replaces "
        "a summary refq wrote before; any other file only with --force.",
        show_default=False,
    ),
]
ProbeSteps = Annotated[
    int | None,
    typer.Option(
        "--probe-steps",
        help="Time steps of the random probe, as a spec's report: probe_steps: says "
        "\\[default: 16; verify: the conversion's]; 0 makes refq convert measure no output "
        "error.",
        show_default=False,
    ),
]
ProbeSequences = Annotated[
    int | None,
    typer.Option(
        "--probe-sequences",
        help="Sequences of the report's random probe, as a spec's report: probe_sequences: "
        "says \\[default: 4].",
        show_default=False,
    ),
]
StripPrefix = Annotated[
    str | None,
    typer.Option(
        "--strip-prefix",
        help="Take this prefix off every checkpoint key before modules are found: a wrapper's, "
        "such as Lightning's model. or DDP's module. (as a spec's strip_prefix: does).",
        show_default=False,
    ),
]
