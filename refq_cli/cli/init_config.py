"""``refq init-config``: a commented spec skeleton for a checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from refq_cli.cli.options import Checkpoint, Force, TrustCode


def init_config_command(
    input_path: Checkpoint,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", help="Write the spec here instead of stdout.", show_default=False
        ),
    ] = None,
    force: Force = False,
    trust_code: TrustCode = False,
) -> None:
    """Print a spec skeleton listing every recurrent module and weight in the checkpoint."""
    from refq_cli.io.checkpoint import load_checkpoint
    from refq_cli.io.outputs import Outputs
    from refq_cli.pipeline.init_config import skeleton

    if output is None:
        typer.echo(skeleton(load_checkpoint(input_path, trust_code=trust_code)), nl=False)
        return
    with Outputs({"--output": output}, {"input": input_path}, force=force) as outputs:
        text = skeleton(load_checkpoint(input_path, trust_code=trust_code))
        outputs.write(output, text.encode())
        outputs.commit()
