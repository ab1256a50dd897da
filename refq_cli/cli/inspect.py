"""``refq inspect``: per-weight quantization parameters of an artifact, or the diff of two."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from refq_cli.cli.options import JsonOutput
from refq_cli.errors import ConversionError, RefqError, printable, strict_json


def inspect_command(
    artifacts: Annotated[
        list[Path],
        typer.Argument(help="The artifact; two artifacts with --diff.", show_default=False),
    ],
    module: Annotated[str, typer.Option("--module", help="Only modules matching this glob.")] = "*",
    weight: Annotated[str, typer.Option("--weight", help="Only weights matching this glob.")] = "*",
    channels: Annotated[
        bool, typer.Option("--channels", help="Print every channel's scale and zero point.")
    ] = False,
    all_tensors: Annotated[bool, typer.Option("--all", help="List the float tensors too.")] = False,
    sort: Annotated[
        str, typer.Option("--sort", help="Row order: artifact (as stored) or sqnr (worst first).")
    ] = "artifact",
    diff: Annotated[
        bool,
        typer.Option(
            "--diff", help="Compare two artifacts weight by weight; exit 1 if they differ."
        ),
    ] = False,
    json_output: JsonOutput = False,
) -> None:
    """Print the quantization parameters stored in an artifact written by refq convert."""
    from rich.console import Console

    from refq_cli.inspect import describe_artifact, diff_artifacts

    if sort not in ("artifact", "sqnr"):
        raise RefqError(f"--sort {sort}: use artifact or sqnr")
    if len(artifacts) != (2 if diff else 1):
        raise RefqError(
            "--diff takes two artifacts"
            if diff
            else "inspect takes one artifact (use --diff to compare two)"
        )
    # Wide enough that logs and pipes get whole rows; a terminal wraps at its own width.
    console = Console(width=None if Console().is_terminal else 200)
    if diff:
        a, b = (
            describe_artifact(p, module=module, weight=weight, channels=True) for p in artifacts
        )
        changes = diff_artifacts(a, b)
        if json_output:
            typer.echo(strict_json({"differences": changes}))
        else:
            render_diff(changes, console, *artifacts)
        if changes:
            raise ConversionError(
                f"{artifacts[0]} and {artifacts[1]} differ in "
                f"{len({c['weight'] for c in changes})} weight(s)"
            )
        return
    desc = describe_artifact(artifacts[0], module=module, weight=weight, channels=channels)
    if sort == "sqnr":
        desc["weights"].sort(key=lambda w: (w["sqnr_db"] is None, w["sqnr_db"] or 0.0))
    if json_output:
        typer.echo(strict_json(desc))
        return
    render_header(desc, console)
    render_table(desc, console)
    render_floats(desc, console, all_tensors)
    if channels:
        render_channels(desc, console)


def plain(value: object) -> Any:
    """``value`` as rich text that shows as written: escaped (:func:`printable`), no markup,
    no emoji codes. Names, paths and metadata come from untrusted files."""
    from rich.text import Text

    return Text(printable(str(value)))


def _line(console: Any, text: str) -> None:
    console.print(plain(text))


def _number(x: float) -> str:
    return f"{x:.3g}"


def _spread(summary: dict[str, float]) -> str:
    if summary["min"] == summary["max"]:
        return _number(summary["min"])
    return " / ".join(_number(summary[k]) for k in ("min", "median", "max"))


def render_header(desc: dict[str, Any], console: Any) -> None:
    source, producer, totals = desc["source"], desc["producer"], desc["totals"]
    _line(console, f"artifact: {desc['path']} (format {desc['format_version']})")
    _line(
        console,
        f"source: {source.get('name')} ({source.get('format')}), sha256 {source.get('sha256')}",
    )
    _line(console, f"producer: refq {producer.get('refq')}, torch {producer.get('torch')}")
    _line(
        console,
        f"totals: {totals['modules']} modules, {totals['quantized_weights']} quantized weights, "
        f"{totals['float_tensors']} float tensors, {totals['tensor_bytes']:,} tensor bytes, "
        f"{totals['file_bytes']:,} file bytes",
    )


def render_table(desc: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    table = Table(
        title="quantized weights (scale and zero point: value, or min / median / max "
        "over channels)",
        title_justify="left",
    )
    for column in (
        "module",
        "type",
        "weight",
        "shape",
        "dtype",
        "qscheme",
        "axis",
        "scale",
        "zero point",
        "SQNR dB",
    ):
        table.add_column(column, no_wrap=column in ("module", "weight"))
    for w in desc["weights"]:
        cells = (
            w["module"] or "<root>",
            w["module_type"],
            w["weight"],
            "x".join(map(str, w["shape"])),
            w["dtype"],
            w["qscheme"],
            "" if w["axis"] is None else str(w["axis"]),
            _spread(w["scale"]),
            _spread(w["zero_point"]),
            "exact" if w["sqnr_db"] is None else f"{w['sqnr_db']:.2f}",
        )
        table.add_row(*map(plain, cells))
    console.print(table)


def render_floats(desc: dict[str, Any], console: Any, list_them: bool) -> None:
    floats = desc["float_tensors"]
    if not list_them:
        _line(console, f"{len(floats)} float tensors kept as they were (list them with --all)")
        return
    for t in floats:
        _line(console, f"  {t['name']}: {t['dtype']} {'x'.join(map(str, t['shape']))}")


def render_channels(desc: dict[str, Any], console: Any) -> None:
    for w in desc["weights"]:
        name = f"{w['module']}.{w['weight']}" if w["module"] else w["weight"]
        _line(console, f"{name}: channel scale zero_point")
        for c, (s, z) in enumerate(zip(w["scales"], w["zero_points"], strict=True)):
            _line(console, f"  {c} {s!r} {z}")


def render_diff(changes: list[dict[str, Any]], console: Any, a: Path, b: Path) -> None:
    if not changes:
        _line(console, f"{a} and {b}: no differences")
        return
    from rich.table import Table

    table = Table(title=plain(f"{a} -> {b}"), title_justify="left")
    for column in ("weight", "change", "before", "after"):
        table.add_column(column)
    for c in changes:
        table.add_row(
            *map(plain, (c["weight"], c["change"], c.get("before", ""), c.get("after", "")))
        )
    console.print(table)
