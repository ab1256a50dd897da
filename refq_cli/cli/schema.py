"""``refq schema``: the JSON Schema of the spec (for editors) or of ``--json`` output."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from refq_cli.errors import RefqError


def schema_command(
    of: Annotated[
        str,
        typer.Argument(
            help="spec: the YAML spec (point editors at it with yaml-language-server); output: "
            "what each command prints with --json ($defs per command)."
        ),
    ] = "spec",
) -> None:
    """Print a JSON Schema: of the YAML spec, or of the commands' --json output."""
    if of == "spec":
        from refq_cli.spec.spec import json_schema

        typer.echo(json.dumps(json_schema(), indent=2))
    elif of == "output":
        from refq_cli.schemas import output_schema

        typer.echo(json.dumps(output_schema(), indent=2))
    else:
        raise RefqError(f"refq schema {of!r}: give spec or output")
