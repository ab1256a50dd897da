"""How far quantized values are from the float ones: SQNR, largest error, clipping. Sums are
taken in float64 folded the same way whatever the thread count, so the statistics (and the
artifact bytes that record them) do not change with it."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TypedDict

import torch

from refq_cli.quant.numerics import WeightQParams, _for_rows, quantize_blocks, row_sums_of_squares


class WeightStats(TypedDict):
    """A weight's quantization parameters in brief and its error under them."""

    shape: list[int]
    qscheme: str
    dtype: str
    axis: int | None
    quant_min: int
    quant_max: int
    scale_min: float
    scale_max: float
    zero_point_min: int
    zero_point_max: int
    sqnr_db: float | None  # None: exact
    max_abs_error: float
    clipped_fraction: float


def sqnr_db(reference: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB; inf when equal, -inf when the signal is 0."""
    return _db(_energy(reference), _energy(reference.float() - test.float()))


def _energy(t: torch.Tensor) -> float:
    """Sum of squares in float64, the same whatever the thread count (a float32 dot product's
    last digits change with it, and so would the report's and the artifact's bytes)."""
    return float(row_sums_of_squares(t.detach().reshape(1, -1))[0])


def _db(signal: float, noise: float) -> float:
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10 * math.log10(signal / noise)


def weight_stats(weight: torch.Tensor, qp: WeightQParams, decomposed: bool) -> WeightStats:
    """SQNR, error and clipping of one weight under its quantization parameters."""
    return quantize_and_measure(weight, qp, decomposed, values=False)[1]


def quantize_and_measure(
    weight: torch.Tensor,
    qp: WeightQParams,
    decomposed: bool,
    on_codes: Callable[[torch.Tensor], None] | None = None,
    *,
    grid: torch.Tensor | None = None,
    values: bool = True,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, WeightStats]:
    """The fake-quantized weight (in the weight's dtype; None without ``values``, which saves
    writing a copy of the weight) and :func:`weight_stats`, in one pass. ``out``: a
    contiguous tensor of the weight's shape and dtype to write the values into.

    ``on_codes`` hears each block's integer codes, in row-major order: the converter streams
    them into the artifact, so the whole weight's codes never sit in memory. ``grid``: values
    already on ``qp``'s grid (GPTQ's) to quantize in place of the weight, whose codes they
    are; the statistics still measure against ``weight``.
    """
    w = weight.detach()
    qp.check_weight(w)
    source = w if grid is None else grid.detach().reshape(w.shape)
    kept = None
    if values:
        kept = torch.empty_like(w, memory_format=torch.contiguous_format) if out is None else out
        assert kept.shape == w.shape and kept.dtype == w.dtype and kept.is_contiguous()
    # dims along which the parameters do not vary: reducing a block over them bounds its values
    varying = qp.axis % w.dim() if qp.per_channel else None
    flat = tuple(d for d in range(w.dim()) if d != varying)
    signal = noise = max_error = 0.0
    clipped = 0
    pairs = None  # each block and its error, one buffer for all: fresh memory costs page faults
    for rows, codes, block_values in quantize_blocks(source, qp, decomposed=decomposed):
        if on_codes is not None:
            on_codes(codes)
        if kept is not None:
            kept[rows] = block_values
        if not codes.numel():
            continue
        block = w[rows].float()
        if pairs is None:
            pairs = torch.empty(2, block.numel(), device=block.device)
        pair = pairs[:, : block.numel()]
        pair[0].copy_(block.reshape(-1))
        error = torch.sub(
            block,
            # the values as the weight's dtype holds them
            block_values if w.dtype == torch.float32 else block_values.to(w.dtype).float(),
            out=pair[1].view(block.shape),
        )
        lo, hi = torch.aminmax(error)
        max_error = max(max_error, -lo.item(), hi.item())
        # sums the thread count does not change (a dot product's does); the pair is scratch
        block_signal, block_noise = row_sums_of_squares(pair, in_place=True).tolist()
        signal += block_signal  # the blocks add up in their order, fixed by the weight's shape
        noise += block_noise
        step = _for_rows(qp, qp.scale, w.dim(), rows)
        zero = _for_rows(qp, qp.zero_point, w.dim(), rows).float()
        # Clipped: beyond half a step outside the codes' range, where rounding alone cannot reach.
        low, high = (qp.quant_min - zero - 0.5) * step, (qp.quant_max - zero + 0.5) * step
        if not flat or not (
            bool((block.amin(flat, keepdim=True) >= low).all())
            and bool((block.amax(flat, keepdim=True) <= high).all())
        ):
            clipped += int(torch.count_nonzero((block < low) | (block > high)))
    return kept, {
        "shape": list(w.shape),
        "qscheme": qp.qscheme,
        "dtype": qp.dtype,
        "axis": qp.axis if qp.per_channel else None,
        "quant_min": qp.quant_min,
        "quant_max": qp.quant_max,
        "scale_min": qp.scale.min().item(),
        "scale_max": qp.scale.max().item(),
        "zero_point_min": int(qp.zero_point.min()),
        "zero_point_max": int(qp.zero_point.max()),
        "sqnr_db": finite(_db(signal, noise)),
        "max_abs_error": max_error,
        "clipped_fraction": clipped / max(1, w.numel()),
    }


def finite(x: float) -> float | None:
    """JSON has no infinity: an exact (error-free) result is reported as null."""
    return x if math.isfinite(x) else None
