"""``refq inspect``: per-weight quantization parameters of an artifact, or the diff of two."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from refq_cli.cli.options import JsonOutput, flag
from refq_cli.cli.streams import plain
from refq_cli.errors import ConversionError, RefqError, plural, strict_json
from refq_cli.kinds import tensor_key


def inspect_command(
    artifacts: Annotated[
        list[Path],
        typer.Argument(help="The artifact; two artifacts with --diff.", show_default=False),
    ],
    module: Annotated[str, typer.Option("--module", help="Only modules matching this glob.")] = "*",
    weight: Annotated[str, typer.Option("--weight", help="Only weights matching this glob.")] = "*",
    channels: Annotated[
        bool, flag("--channels", help="Print every channel's scale and zero point.")
    ] = False,
    all_tensors: Annotated[bool, flag("--all", help="List the float tensors too.")] = False,
    sort: Annotated[
        str, typer.Option("--sort", help="Row order: artifact (as stored) or sqnr (worst first).")
    ] = "artifact",
    diff: Annotated[
        bool,
        flag(
            "--diff",
            help="Compare two artifacts: metadata, modules and every tensor's bytes; exit 1 "
            "if they differ. --module/--weight narrow it to those tensors and modules.",
        ),
    ] = False,
    json_output: JsonOutput = False,
) -> None:
    """Print the quantization parameters stored in an artifact written by refq convert."""
    from rich.console import Console

    from refq_cli.pipeline.inspect import describe_artifact, diff_artifacts
    from refq_cli.spec.spec import MAX_GLOB

    if sort not in ("artifact", "sqnr"):
        raise RefqError(f"--sort {sort}: use artifact or sqnr")
    for option, glob in (("--module", module), ("--weight", weight)):
        if len(glob) > MAX_GLOB:
            raise RefqError(f"{option}: a glob of {len(glob)} characters; at most {MAX_GLOB}")
    if len(artifacts) != (2 if diff else 1):
        raise RefqError(
            "--diff takes two artifacts"
            if diff
            else "inspect takes one artifact (use --diff to compare two)"
        )
    # Wide enough that logs and pipes get whole rows; a terminal wraps at its own width.
    console = Console(width=None if Console().is_terminal else 200)
    if diff:
        changes = diff_artifacts(*artifacts, module=module, weight=weight)
        if json_output:
            typer.echo(strict_json({"differences": changes}))
        else:
            render_diff(changes, console, *artifacts)
        if changes:
            raise ConversionError(
                f"{artifacts[0]} and {artifacts[1]} differ ({plural(len(changes), 'difference')})"
            )
        return
    desc = describe_artifact(artifacts[0], module=module, weight=weight, channels=channels)
    filters = [f"--{name} {glob}" for name, glob in (("module", module), ("weight", weight))]
    filters = [f for f in filters if not f.endswith(" *")]
    if not desc["weights"] and filters:
        names = sorted({tensor_key(w["module"], w["weight"]) for w in _all_weights(artifacts[0])})
        raise RefqError(
            f"{' '.join(filters)}: matches no quantized weight of {artifacts[0]}; it has "
            + (", ".join(names[:8]) + (", ..." if len(names) > 8 else "") if names else "none")
        )
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


def _all_weights(path: Path) -> list[dict[str, Any]]:
    from refq_cli.pipeline.inspect import describe_artifact

    return describe_artifact(path)["weights"]


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
    for shard in source.get("shards", []):
        _line(console, f"  shard: {shard['name']}, sha256 {shard['sha256']}")
    _line(console, f"producer: refq {producer.get('refq')}, torch {producer.get('torch')}")
    gate = desc["gate"]
    if gate is not None:
        verdict = "passed" if gate["passed"] else "MISSED: an artifact set aside, not accepted"
        _line(console, f"gate: minimum SQNR {gate['min_sqnr']:g} dB, {verdict}")
    _line(
        console,
        f"totals: {plural(totals['modules'], 'module')}, "
        f"{plural(totals['quantized_weights'], 'quantized weight')}, "
        f"{plural(totals['float_tensors'], 'float tensor')}, "
        f"{totals['tensor_bytes']:,} tensor bytes, {totals['file_bytes']:,} file bytes",
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
            w["module"],
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
        name = tensor_key(w["module"], w["weight"])
        _line(console, f"{name}: channel scale zero_point")
        for c, (s, z) in enumerate(zip(w["scales"], w["zero_points"], strict=True)):
            _line(console, f"  {c} {s!r} {z}")


_ROLES = {"codes": "codes", "scales": "scales", "zero_points": "zero points"}


def render_diff(changes: list[dict[str, Any]], console: Any, a: Path, b: Path) -> None:
    if not changes:
        _line(console, f"{a} and {b}: no differences")
        return
    _line(console, f"{a} → {b}: {plural(len(changes), 'difference')}")
    for c in changes:
        _line(console, "  " + diff_line(c, a, b))


def diff_line(c: dict[str, Any], a: Path, b: Path) -> str:
    """One record of ``diff_artifacts`` as a line a person reads."""
    if c["section"] == "tensors":
        what, change = c["tensor"], c["change"]
        if change in ("added", "removed"):
            where = b if change == "added" else a
            return f"{what}: only in {where} ({c['dtype']} {_shape(c['shape'])})"
        if change == "changed":
            show = _shape if c["field"] == "shape" else str
            return f"{what}: tensor {c['field']} {show(c['before'])} → {show(c['after'])}"
        role, worst = _ROLES.get(c["role"], "values"), c["max_abs_diff"]
        if isinstance(worst, int):  # codes, zero points
            return f"{what}: {c['differ']:,} of {c['of']:,} {role} differ (max |Δ| {worst:,})"
        worst = "nan" if worst != worst else _number(worst)
        return f"{what}: {c['differ']:,} of {c['of']:,} {role} differ, max |Δ| {worst}"
    label = f"module {c['module']}" if c["section"] == "modules" else c["section"]
    if "field" not in c:  # a module in one artifact only
        return f"{label}: only in {b if c['change'] == 'added' else a} ({c['type']})"
    before, after = _pair(c.get("before", _ABSENT), c.get("after", _ABSENT))
    field = c["field"]
    if c["section"] == "modules" and field.startswith("weights."):  # gate.weight_hh: dtype ...
        weight, _, field = field.removeprefix("weights.").partition(".")
        label = tensor_key(c["module"], weight)
        return f"{label}: {field or 'parameters'} {before} → {after}"
    if not field:
        return f"{label}: {before} → {after}"
    if c["section"] == "source":  # source sha256: 1a2b… → 4d5e…
        return f"{label} {field}: {before} → {after}"
    return f"{label}: {field} {before} → {after}"


_ABSENT = object()


def _shape(shape: list[int]) -> str:
    return "x".join(map(str, shape)) or "scalar"


def _pair(x: Any, y: Any) -> tuple[str, str]:
    """Two JSON values as short text that still shows how they differ: numbers with as many
    digits as that takes, sha256 digests by their first dozen or so."""
    if all(type(v) is float for v in (x, y)):
        for digits in range(3, 18):
            shown = f"{x:.{digits}g}", f"{y:.{digits}g}"
            if shown[0] != shown[1]:
                return shown
    if all(isinstance(v, str) and len(v) == 64 and v.isalnum() for v in (x, y)):
        keep = next(n for n in range(12, 65) if x[:n] != y[:n])
        return x[:keep] + "…", y[:keep] + "…"
    return _value(x), _value(y)


def _value(v: Any) -> str:
    if v is _ABSENT:
        return "(absent)"
    if type(v) is float:
        return _number(v)
    if isinstance(v, (bool, type(None), dict, list)):
        return json.dumps(v)  # true, null, {}, []: the leaves of flattened metadata
    return str(v)
