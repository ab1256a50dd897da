"""``refq export``: an artifact's modules as ONNX models with integer weights."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated

import typer

from refq_cli.cli.options import Force, JsonOutput, flag
from refq_cli.deploy import DEFAULT_OPSET, FOUR_BIT_OPSET, SUPPORTED_OPSETS
from refq_cli.errors import RefqWarning, plural, printable, strict_json


def export_command(
    artifact: Annotated[Path, typer.Argument(help="The artifact.", show_default=False)],
    out_dir: Annotated[
        str,  # as text: an empty one must reach the library's check, not become "."
        typer.Option(
            "--out-dir",
            "-o",
            help="Folder for the models, one per module: encoder.lstm.onnx (root.onnx for a "
            "module at the root). Models refq wrote there are replaced; other files only "
            "with --force.",
            show_default=False,
            metavar="<path>",
        ),
    ],
    format: Annotated[str, typer.Option("--format", help="The format: onnx.")] = "onnx",
    module: Annotated[str, typer.Option("--module", help="Only modules matching this glob.")] = "*",
    opset: Annotated[
        int,
        typer.Option(
            "--opset",
            help=f"ONNX opset, {SUPPORTED_OPSETS[0]} to {SUPPORTED_OPSETS[-1]}; 4-bit weights "
            f"(INT4, UINT4) need {FOUR_BIT_OPSET} or later.",
        ),
    ] = DEFAULT_OPSET,
    target: Annotated[
        str | None,
        typer.Option(
            "--target",
            help="Refuse what this runtime cannot run: onnxruntime, or tensorrt (int8 or int4 "
            "weights with zero points of 0).",
            show_default=False,
        ),
    ] = None,
    no_initial_states: Annotated[
        bool,
        flag(
            "--no-initial-states",
            help="Models take input alone, the states starting at zero; by default they take "
            "h_0 (and c_0) as the module's forward takes hx.",
        ),
    ] = False,
    force: Force = False,
    json_output: JsonOutput = False,
) -> None:
    """Write each module of an artifact as an ONNX model: integer weights through
    DequantizeLinear into ONNX's LSTM, GRU and RNN operators, checked by onnx's checker."""
    from refq_cli.pipeline.api import export

    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always", RefqWarning)
        result = export(
            artifact,
            out_dir,
            format=format,
            module=module,
            opset=opset,
            initial_states=not no_initial_states,
            target=target,
            force=force,
        )
    for warning in said:
        if isinstance(warning.message, RefqWarning):
            typer.echo(f"refq: warning: {printable(str(warning.message))}", err=True)
    if json_output:
        typer.echo(strict_json(result))
        return
    for m in result["models"]:
        typer.echo(
            f"{m['module']} -> {m['path']} ({plural(m['bytes'], 'byte')}; inputs "
            f"{', '.join(m['inputs'])}; outputs {', '.join(m['outputs'])})"
        )
