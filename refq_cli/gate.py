"""Quality gates: a minimum SQNR per weight, judged on a conversion's statistics or on those an
artifact records. Plain Python: importing this does not import torch."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

GATE_SHOWN = 3  # weights a missed gate's message names (the worst); the rest are counted


@dataclass
class Gate:
    """A conversion's ``min_sqnr``. :meth:`Conversion.metadata` records :meth:`judge`'s verdict
    in the artifact (``refq.gate``), and a job's artifact that missed its gate is staged under
    its rejected name (``refq_cli.batch.rejected_job``), never in the accepted place."""

    min_sqnr: float
    below: list[str] | None = None  # the weights under it, once judged

    def judge(self, conversion: Any) -> dict[str, Any]:
        self.below = conversion.below(self.min_sqnr)
        return {"min_sqnr": self.min_sqnr, "passed": not self.below}


def weights_below(weights: Iterable[tuple[str, float | None]], min_sqnr: float) -> list[str]:
    """``name (SQNR dB)`` of each (name, SQNR) under ``min_sqnr``, worst first; an exact
    weight (None) never is, NaN always is."""
    failing = [(s, n) for n, s in weights if s is not None and not s >= min_sqnr]
    return [f"{n} ({s:.2f} dB)" for s, n in sorted(failing)]


def gate_error(min_sqnr: float, below: Sequence[str]) -> str:
    """One short line: how many weights missed the gate, the worst few, how many more."""
    more = len(below) - GATE_SHOWN
    worst = ", ".join(below[:GATE_SHOWN]) + (f" and {more} more" if more > 0 else "")
    return f"{len(below)} weight(s) below --min-sqnr {min_sqnr:g} dB: {worst}"
