"""What a run of jobs prints and writes for people and scripts: totals, the ``--json`` output
(``refq_cli/schemas/output.schema.json``) and the ``--summary-md`` table."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from refq_cli.errors import markdown_cell
from refq_cli.pipeline.batch import STATUSES, JobResult
from refq_cli.pipeline.jobs import SUMMARY_HEADING


def totals(results: Sequence[JobResult]) -> dict[str, int]:
    """How many jobs ended in each status, every status named."""
    return {s: sum(r.status == s for r in results) for s in STATUSES}


def totals_line(results: Sequence[JobResult]) -> str:
    """``2 converted, 1 gate`` (statuses with no job left out), for people."""
    counts = totals(results).items()
    return ", ".join(f"{n} {s.replace('_', ' ')}" for s, n in counts if n) or "no jobs"


def run_summary(results: Sequence[JobResult]) -> dict[str, Any]:
    """The ``--json`` output of ``refq convert`` and ``refq batch``, one shape for one job or
    many (``refq_cli/schemas/output.schema.json``)."""
    return {"jobs": [r.record() for r in results], "totals": totals(results)}


def summary_markdown(results: Sequence[JobResult]) -> str:
    """A Markdown table of the jobs, for CI step summaries."""
    lines = [
        SUMMARY_HEADING,
        "",
        totals_line(results),
        "",
        "| input | output | status | worst SQNR dB | seconds | error |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        sqnr = "" if r.worst_sqnr_db is None else f"{r.worst_sqnr_db:.2f}"
        status = r.status.replace("_", " ")
        cells = [r.input, r.output, status, sqnr, f"{r.seconds:.2f}", r.error or ""]
        lines.append("| " + " | ".join(map(markdown_cell, cells)) + " |")
    return "\n".join(lines) + "\n"
