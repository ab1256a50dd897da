"""Quality gates: a minimum SQNR, judged on a conversion's per-weight statistics, on those an
artifact records, or on the module outputs ``refq verify`` measures. Plain Python: importing this
does not import torch.

A judged gate is one record, the same in reports, artifacts' reports and every ``--json``
output (:func:`gate_record`): ``{"min_sqnr_db", "measure", "passed", "below": [{"name",
"sqnr_db"}]}``, worst first.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

GATE_SHOWN = 3  # names a missed gate's message shows (the worst); the rest are counted
WEIGHT_SQNR = "weight_sqnr"  # what refq convert's gate measures
OUTPUT_SQNR = "output_sqnr"  # what refq verify's gate measures


@dataclass
class Gate:
    """A conversion's ``min_sqnr``. :meth:`Conversion.metadata` records :meth:`judge`'s verdict
    in the artifact (``refq.gate``), and a job's artifact that missed its gate is staged under
    its rejected name (``refq_cli.pipeline.batch.rejected_job``), never in the accepted place."""

    min_sqnr: float
    below: list[dict[str, Any]] | None = None  # the weights under it, once judged

    def judge(self, conversion: Any) -> dict[str, Any]:
        self.below = conversion.below(self.min_sqnr)
        return {"min_sqnr": self.min_sqnr, "passed": not self.below}


def named_below(named: Iterable[tuple[str, float | None]], min_sqnr: float) -> list[dict[str, Any]]:
    """``{"name", "sqnr_db"}`` of each (name, SQNR dB) under ``min_sqnr``, worst first; an exact
    one (None) never is, NaN always is (first)."""
    failing = [(name, s) for name, s in named if s is not None and not s >= min_sqnr]
    failing.sort(
        key=lambda item: (not math.isnan(item[1]), item[1] if item[1] == item[1] else 0.0, item[0])
    )
    return [{"name": name, "sqnr_db": s} for name, s in failing]


def gate_record(min_sqnr: float, measure: str, below: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The judged gate as reports and ``--json`` show it."""
    return {"min_sqnr_db": min_sqnr, "measure": measure, "passed": not below, "below": list(below)}


def gate_error(min_sqnr: float, below: Sequence[dict[str, Any]], noun: str = "weight") -> str:
    """One short line: how many missed the gate, the worst few, how many more."""
    more = len(below) - GATE_SHOWN
    worst = ", ".join(f"{b['name']} ({b['sqnr_db']:.2f} dB)" for b in below[:GATE_SHOWN])
    return f"{len(below)} {noun}(s) below --min-sqnr {min_sqnr:g} dB: {worst}" + (
        f" and {more} more" if more > 0 else ""
    )
