"""The rows each weight of a recurrent layer multiplies, on calibration calls, as Hessians.

For one layer (a cell, or one layer of a sequence module with both its directions) run on
calibration calls by the float model: ``weight_ih`` multiplies the layer's input at every step
(both directions the same), ``weight_hh`` the hidden state before each step (``h_0`` at the
first; for the reverse direction the steps run backwards), an LSTM's ``weight_hr`` the cell
output ``o_t * tanh(c_t)`` it projects. :func:`layer_hessians` sums ``XᵀX`` of those rows
(:class:`refq_cli.quant.calibrated.HessianSum`), for the weights asked for.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from refq_cli.pipeline.calibration import Call
from refq_cli.quant.calibrated import HessianSum


def layer_hessians(
    layer: nn.Module,
    calls: Sequence[Call],
    outputs: Sequence[torch.Tensor],
    names: Iterable[str],
) -> dict[str, torch.Tensor]:
    """``XᵀX`` per weight among ``names`` (the layer's own names: ``weight_ih_l0_reverse``,
    ``weight_hh`` for a cell), over the rows it multiplies on ``calls`` (time-major inputs and
    the layer's initial states), whose outputs (time-major, a cell's unrolled) the float
    layer gave as ``outputs``."""
    wanted = [n for n in names if n.startswith("weight")]
    if not wanted:
        return {}
    sums = {n: HessianSum(getattr(layer, n).shape[1]) for n in wanted}
    with torch.no_grad():
        for call, output in zip(calls, outputs, strict=True):
            if getattr(layer, "proj_size", 0):
                _projected_rows(layer, call, sums)
            else:
                _rows(layer, call, output, sums)
    return {n: s.sum for n, s in sums.items()}


def _add(sums: dict[str, HessianSum], name: str, rows: torch.Tensor) -> None:
    if name in sums:
        sums[name].add(rows)


def _rows(layer: nn.Module, call: Call, output: torch.Tensor, sums: dict[str, HessianSum]) -> None:
    """A cell or a one-layer RNN, GRU or LSTM: its inputs, and the states before each step,
    which are ``h_0`` (zeros if none) and the outputs but the last (the first, running
    backwards)."""
    h = layer.hidden_size
    if isinstance(layer, nn.RNNCellBase):
        h_0 = call.h_0 if call.h_0 is not None else call.input.new_zeros(call.sequences, h)
        _add(sums, "weight_ih", call.input)
        _add(sums, "weight_hh", h_0)
        _add(sums, "weight_hh", output[:-1])
        return
    for suffix in ("", "_reverse"):
        _add(sums, f"weight_ih_l0{suffix}", call.input)
    h_0 = _states(layer, call, h)
    _add(sums, "weight_hh_l0", h_0[0])
    _add(sums, "weight_hh_l0", output[:-1, :, :h])
    if layer.bidirectional:
        _add(sums, "weight_hh_l0_reverse", h_0[1])
        _add(sums, "weight_hh_l0_reverse", output[1:, :, h:])


def _states(layer: nn.Module, call: Call, size: int) -> torch.Tensor:
    directions = 1 + layer.bidirectional
    if call.h_0 is not None:
        return call.h_0
    return call.input.new_zeros(directions, call.sequences, size)


def _projected_rows(layer: nn.LSTM, call: Call, sums: dict[str, HessianSum]) -> None:
    """A one-layer LSTM with ``proj_size``, stepped here: the states ``h_{t-1}`` (projected)
    and the cell outputs ``o_t * tanh(c_t)`` the projection multiplies, which no output shows."""
    for suffix in ("", "_reverse"):
        _add(sums, f"weight_ih_l0{suffix}", call.input)
    h_0 = _states(layer, call, layer.proj_size)
    c_0 = (
        call.c_0
        if call.c_0 is not None
        else call.input.new_zeros(h_0.shape[0], call.sequences, layer.hidden_size)
    )
    for d, suffix in enumerate(("", "_reverse")[: 1 + layer.bidirectional]):

        def weight(name: str, suffix: str = suffix) -> torch.Tensor | None:
            return getattr(layer, f"{name}_l0{suffix}", None)

        h, c = h_0[d], c_0[d]
        steps = call.input if d == 0 else call.input.flip(0)
        for x in steps:
            _add(sums, f"weight_hh_l0{suffix}", h)
            gates = x @ weight("weight_ih").T + h @ weight("weight_hh").T
            for bias in (weight("bias_ih"), weight("bias_hh")):
                if bias is not None:
                    gates = gates + bias
            i, f, g, o = gates.chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            m = torch.sigmoid(o) * torch.tanh(c)
            _add(sums, f"weight_hr_l0{suffix}", m)
            h = m @ weight("weight_hr").T
