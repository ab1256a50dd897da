"""``refq converters``: which float module types refq can convert, and with what."""

from __future__ import annotations

import typer


def converters_command() -> None:
    """List the registered converters, built-in and from entry points."""
    from refq_cli.reference.registry import converters, describe

    for float_type, converter in sorted(converters().items(), key=lambda kv: describe(kv[0])):
        typer.echo(f"{describe(float_type)} -> {describe(converter)}")
