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
TrustPickle = Annotated[
    bool,
    typer.Option(
        "--trust-pickle",
        help="Allow checkpoints that unpickle Python objects (a whole nn.Module). Unpickling "
        "can run code: only for files you trust.",
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
