"""The root ``refq`` app. Commands are wired here, one module each.

Nothing imported at module level may import torch: ``refq --help`` must stay instant.
"""

from __future__ import annotations

from typing import Annotated

import typer

from refq_cli import __version__

app = typer.Typer(
    name="refq",
    help="Turn float PyTorch recurrent models into reference-quantized models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"refq {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_print_version,
            is_eager=True,
            help="Print refq's version and exit.",
        ),
    ] = False,
) -> None:
    """Turn float PyTorch recurrent models into reference-quantized models."""


def main() -> None:
    """Console-script entry point."""
    app()
