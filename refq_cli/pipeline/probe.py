"""Probing a module: its output error against the float module on a seeded random input or on
calibration data, and the drift of that error over time steps."""

from __future__ import annotations

from typing import TypedDict

import torch
from torch import nn

from refq_cli.errors import RefqError
from refq_cli.kinds import display_path
from refq_cli.quant.statistics import finite, sqnr_db


class ProbeResult(TypedDict):
    """A module's output error against the float module on a probe."""

    probe_shape: list[int]
    output_sqnr_db: float | None  # None: exact
    output_max_abs_error: float
    hidden_error_per_step: list[float]


PROBE_STEPS = 16
PROBE_BATCH = 4


def probe_input(module: nn.Module, seed: int = 0) -> torch.Tensor:
    """A seeded normal input for ``module``: (steps, batch, features) in its layout."""
    gen = torch.Generator().manual_seed(seed)
    weight = next(module.parameters())
    x = torch.randn(PROBE_STEPS, PROBE_BATCH, module.input_size, generator=gen)
    if getattr(module, "batch_first", False):
        x = x.transpose(0, 1)
    return x.to(device=weight.device, dtype=weight.dtype)


def probe_for(module: nn.Module, given: torch.Tensor | None, path: str) -> torch.Tensor:
    """The calibration input given for ``module``, checked, or else the seeded random probe."""
    if given is None:
        return probe_input(module)
    layout = (
        "(batch, time, features)"
        if getattr(module, "batch_first", False)
        else ("(time, batch, features)")
    )
    if given.dim() != 3 or given.shape[-1] != module.input_size or 0 in given.shape:
        raise RefqError(
            f"the calibration input for {display_path(path)} must be a non-empty {layout} tensor "
            f"with {module.input_size} features, got shape {tuple(given.shape)}"
        )
    if not given.is_floating_point() or not bool(torch.isfinite(given).all()):
        raise RefqError(
            f"the calibration input for {display_path(path)} must hold finite floating-point values"
        )
    weight = next(module.parameters())
    return given.to(device=weight.device, dtype=weight.dtype)


def probe_module(float_mod: nn.Module, ref_mod: nn.Module, x: torch.Tensor) -> ProbeResult:
    """Output error of the reference module against the float one, and its drift over time.

    ``x`` is (steps, batch, features), or (batch, steps, features) for batch_first modules;
    cells are run step by step over its first axis, feeding back their own hidden state.
    """
    cell = isinstance(float_mod, nn.RNNCellBase)
    expected, got = module_output(float_mod, x, cell), module_output(ref_mod, x, cell)
    return probe_result(expected, got, x, getattr(float_mod, "batch_first", False))


def module_output(module: nn.Module, x: torch.Tensor, cell: bool) -> torch.Tensor:
    """The output sequence of ``module`` on ``x``, in the module's layout; a cell unrolled."""
    with torch.no_grad():
        return _unroll(module, x) if cell else module(x)[0]


def probe_result(
    expected: torch.Tensor, got: torch.Tensor, x: torch.Tensor, batch_first: bool
) -> ProbeResult:
    """The report's probe entries from the float and reference outputs on probe ``x``."""
    if batch_first:
        expected, got = expected.transpose(0, 1), got.transpose(0, 1)
    per_step = (expected - got).abs().flatten(1).amax(dim=1)
    return {
        "probe_shape": list(x.shape),
        "output_sqnr_db": finite(sqnr_db(expected, got)),
        "output_max_abs_error": per_step.max().item(),
        "hidden_error_per_step": [round(v, 9) for v in per_step.tolist()],
    }


def _unroll(cell: nn.Module, x: torch.Tensor) -> torch.Tensor:
    hx = None
    outputs = []
    for step in x:
        hx = cell(step, hx)
        outputs.append(hx[0] if isinstance(hx, tuple) else hx)
    return torch.stack(outputs)
