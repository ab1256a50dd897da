"""``refq init-config``: a commented spec skeleton for a checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from refq_cli.cli.options import Checkpoint, Force, TrustPickle


def init_config_command(
    input_path: Checkpoint,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", help="Write the spec here instead of stdout.", show_default=False
        ),
    ] = None,
    force: Force = False,
    trust_pickle: TrustPickle = False,
) -> None:
    """Print a spec skeleton listing every recurrent module and weight in the checkpoint."""
    from refq_cli.checkpoint import load_checkpoint
    from refq_cli.files import check_outputs, write_atomic
    from refq_cli.init_config import skeleton

    text = skeleton(load_checkpoint(input_path, trust_pickle=trust_pickle))
    if output is None:
        typer.echo(text, nl=False)
    else:
        check_outputs({"--output": output}, {"input": input_path}, force=force)
        write_atomic(output, lambda p: p.write_text(text), force=force)
