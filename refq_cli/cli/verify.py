"""``refq verify``: rerun an artifact against its float checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from refq_cli.cli.options import JsonOutput, ProbeSequences, ProbeSteps, TrustCode
from refq_cli.errors import ConversionError, strict_json
from refq_cli.pipeline.gate import checked_min_sqnr, gate_error


def verify_command(
    artifact: Annotated[Path, typer.Argument(help="The artifact.", show_default=False)],
    against: Annotated[
        Path,
        typer.Option(
            "--against", help="The float checkpoint it was converted from.", show_default=False
        ),
    ],
    calibration: Annotated[
        Path | None,
        typer.Option(
            "--calibration",
            help="Calibration inputs to probe on, as for refq convert.",
            show_default=False,
        ),
    ] = None,
    min_sqnr: Annotated[
        float | None,
        typer.Option(
            "--min-sqnr",
            help="Gate: exit 1 when a module's output SQNR (dB) is below this.",
            show_default=False,
        ),
    ] = None,
    probe_steps: ProbeSteps = None,
    probe_sequences: ProbeSequences = None,
    trust_code: TrustCode = False,
    json_output: JsonOutput = False,
) -> None:
    """Reload an artifact, rerun its modules and the float ones on a probe, print the error."""
    from rich.console import Console
    from rich.table import Table

    from refq_cli.cli.streams import plain
    from refq_cli.pipeline.verify import verify

    min_sqnr = checked_min_sqnr(min_sqnr)
    result = verify(
        artifact,
        against,
        calibration=calibration,
        trust_code=trust_code,
        min_sqnr=min_sqnr,
        probe_steps=probe_steps,
        probe_sequences=probe_sequences,
    )
    if json_output:
        typer.echo(strict_json(result))
    else:
        table = Table(title=plain(f"{artifact} against {against}"), title_justify="left")
        for column in (
            "module",
            "type",
            "probe",
            "output SQNR dB",
            "max abs err",
            "error at last step",
        ):
            table.add_column(column)
        for m in result["modules"]:
            sqnr = m["output_sqnr_db"]
            cells = (
                m["path"],
                m["float_type"],
                m["probe"],
                "exact" if sqnr is None else f"{sqnr:.2f}",
                f"{m['output_max_abs_error']:.4g}",
                f"{m['hidden_error_per_step'][-1]:.4g}",
            )
            table.add_row(*map(plain, cells))
        Console().print(table)
    if not result["source_matches"]:
        raise ConversionError(
            f"{against} is not the checkpoint {artifact} was converted from (sha256 differs)"
        )
    gate = result["gate"]
    if gate is not None and not gate["passed"]:
        raise ConversionError(
            f"quality gate: {gate_error(gate['min_sqnr_db'], gate['below'], noun='module')}"
        )
