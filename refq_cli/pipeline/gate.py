"""Quality gates: a minimum SQNR, judged on a conversion's per-weight statistics, on those an
artifact records, or on the module outputs ``refq verify`` measures. Plain Python: importing this
does not import torch.

A judged gate is one record (:class:`GateRecord`), the same in reports and every ``--json``
output: ``{"min_sqnr_db", "measure", "passed", "below": [{"name", "sqnr_db"}]}``, worst first.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

from refq_cli.errors import RefqError, argument, plural
from refq_cli.kinds import tensor_key

GATE_SHOWN = 3  # names a missed gate's message shows (the worst); the rest are counted
WEIGHT_SQNR = "weight_sqnr"  # what refq convert's gate measures
OUTPUT_SQNR = "output_sqnr"  # what refq verify's gate measures


class Below(TypedDict):
    name: str  # module.weight (convert) or the module path (verify)
    sqnr_db: float  # NaN in memory, null in JSON


class GateRecord(TypedDict):
    min_sqnr_db: float
    measure: str  # WEIGHT_SQNR or OUTPUT_SQNR
    passed: bool
    below: list[Below]


@dataclass
class Gate:
    """A conversion's ``min_sqnr``, and once :meth:`judge` has run, the weights under it. A
    job's artifact that missed its gate is staged under its rejected name
    (``refq_cli.pipeline.batch.rejected_job``), never in the accepted place."""

    min_sqnr: float
    below: list[Below] | None = None

    def judge(self, weights: Iterable[Mapping[str, Any]]) -> GateRecord:
        """The verdict on a conversion's weight rows (``module``, ``weight``, ``sqnr_db``)."""
        named = ((tensor_key(w["module"], w["weight"]), w["sqnr_db"]) for w in weights)
        self.below = named_below(named, self.min_sqnr)
        return gate_record(self.min_sqnr, WEIGHT_SQNR, self.below)


def checked_min_sqnr(min_sqnr: float | None) -> float | None:
    """``min_sqnr`` (dB) when it is a finite number or None; RefqError otherwise."""
    if min_sqnr is not None and not math.isfinite(min_sqnr):
        raise RefqError(f"{argument('min_sqnr', min_sqnr)}: give a finite number of dB")
    return min_sqnr


def named_below(named: Iterable[tuple[str, float | None]], min_sqnr: float) -> list[Below]:
    """``{"name", "sqnr_db"}`` of each (name, SQNR dB) under ``min_sqnr``, worst first; an exact
    one (None) never is, NaN always is (first)."""
    failing = [(name, s) for name, s in named if s is not None and not s >= min_sqnr]
    failing.sort(
        key=lambda item: (not math.isnan(item[1]), 0.0 if math.isnan(item[1]) else item[1], item[0])
    )
    return [{"name": name, "sqnr_db": s} for name, s in failing]


def gate_record(min_sqnr: float, measure: str, below: Sequence[Below]) -> GateRecord:
    """The judged gate as reports and ``--json`` show it."""
    return {"min_sqnr_db": min_sqnr, "measure": measure, "passed": not below, "below": list(below)}


def gate_error(min_sqnr: float, below: Sequence[Below], noun: str = "weight") -> str:
    """One short line: how many missed the gate, the worst few, how many more."""
    more = len(below) - GATE_SHOWN
    worst = ", ".join(f"{b['name']} ({b['sqnr_db']:.2f} dB)" for b in below[:GATE_SHOWN])
    return f"{plural(len(below), noun)} below {min_sqnr:g} dB: {worst}" + (
        f" and {more} more" if more > 0 else ""
    )


def gate_line(gate: GateRecord) -> str:
    """The gate's line in the Markdown report."""
    verdict = gate_error(gate["min_sqnr_db"], gate["below"]) if gate["below"] else "passed"
    return f"Quality gate (minimum SQNR {gate['min_sqnr_db']:g} dB): {verdict}."
