"""Observers: the scale and zero point of a weight, from the weight and its QParamSpec.

* ``minmax``: the weight's range (PyTorch's MinMaxObserver formulas, range widened to hold 0);
* ``percentile``: the range between the (100 - p)th and pth percentiles, clipping outliers;
* ``mse``: the clipping of the min/max range that minimises the squared quantization error,
  searched per tensor or per channel;
* ``output``: the clipping of the min/max range that minimises the layer's output error
  ``e H eᵀ`` on calibration inputs (:mod:`refq_cli.quant.calibrated`), per output channel
  for per-channel schemes along axis 0, one ratio for the whole weight otherwise;
* ``fixed``: the numbers written in the spec.

Symmetric schemes use ``max(|lo|, |hi|)`` around the middle code, affine schemes ``[lo, hi]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

import torch

from refq_cli.errors import QParamsError
from refq_cli.kinds import SCHEMES
from refq_cli.quant.calibrated import check_hessian, gptq_candidates, output_errors, total
from refq_cli.quant.numerics import (
    DTYPES,
    WeightQParams,
    fake_quantize,
    fake_quantized_rows,
    row_sums_of_squares,
)
from refq_cli.spec.spec import QParamSpec

_EPS = torch.finfo(torch.float32).eps
MSE_CANDIDATES = 100  # clipping ratios searched by the mse observer, from 1.0 down to 0.01


def observe(
    weight: torch.Tensor, spec: QParamSpec, where: str, hessian: torch.Tensor | None = None
) -> WeightQParams:
    """Quantization parameters for ``weight``; SpecError at the spec setting that is wrong.
    ``hessian``: ``XᵀX`` of the calibration inputs the weight multiplies, which the ``output``
    observer needs."""
    try:
        if spec.observer == "fixed":
            qp = WeightQParams.create(
                qscheme=spec.qscheme,
                dtype=spec.dtype,
                scale=spec.scale,
                zero_point=spec.zero_point,
                axis=spec.axis,
                quant_min=spec.quant_min,
                quant_max=spec.quant_max,
                device=weight.device,
                where=where,
            )
        elif spec.observer == "output":
            qp = output(weight.detach().float(), spec, where, hessian)
        else:
            qp = OBSERVERS[spec.observer](weight.detach().float(), spec, where)
        qp.check_weight(weight, where)
    except QParamsError as exc:
        raise spec.error(exc, where) from None
    return qp


def _channels(w: torch.Tensor, spec: QParamSpec, per_channel: bool, where: str) -> torch.Tensor:
    """The weight as (channels, values): one row per channel, or a single row."""
    if not per_channel:
        return w.reshape(1, -1)
    if not -w.dim() <= spec.axis < w.dim():
        raise QParamsError(
            f"{where}: axis {spec.axis} is out of range for a {w.dim()}-D weight", field="axis"
        )
    return w.movedim(spec.axis, 0).reshape(w.shape[spec.axis], -1)


def _from_range(lo: torch.Tensor, hi: torch.Tensor, spec: QParamSpec, where: str) -> WeightQParams:
    """PyTorch's observer formulas: scale and zero point for the range [lo, hi] per row."""
    affine, symmetric = SCHEMES[spec.qscheme]
    d = DTYPES[spec.dtype]
    qmin = d.qmin if spec.quant_min is None else spec.quant_min
    qmax = d.qmax if spec.quant_max is None else spec.quant_max
    # float32 arithmetic in PyTorch's order, so scales match its observers bit for bit
    lo = torch.clamp(lo.float(), max=0.0)
    hi = torch.clamp(hi.float(), min=0.0)
    if symmetric:
        scale = torch.maximum(-lo, hi) / (float(qmax - qmin) / 2)
        scale = torch.clamp(scale, min=_EPS)
        zero_point: torch.Tensor | None = None
    else:
        scale = torch.clamp((hi - lo) / float(qmax - qmin), min=_EPS)
        zero_point = (qmin - torch.round(lo / scale).to(torch.int32)).clamp(qmin, qmax)
    per_channel = affine == "per_channel_affine"
    return WeightQParams.create(
        qscheme=spec.qscheme,
        dtype=spec.dtype,
        scale=scale if per_channel else scale.reshape(()),
        zero_point=None
        if zero_point is None
        else (zero_point if per_channel else zero_point.reshape(())),
        axis=spec.axis,
        quant_min=qmin,
        quant_max=qmax,
        device=scale.device,
        where=where,
    )


def _per_channel(spec: QParamSpec) -> bool:
    return SCHEMES[spec.qscheme][0] == "per_channel_affine"


def minmax(w: torch.Tensor, spec: QParamSpec, where: str) -> WeightQParams:
    rows = _channels(w, spec, _per_channel(spec), where)
    return _from_range(*_row_range(rows), spec, where)


def _row_range(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # two reductions: several times faster than torch.aminmax(rows, dim=1) on CPU
    return rows.amin(dim=1), rows.amax(dim=1)


def percentile(w: torch.Tensor, spec: QParamSpec, where: str) -> WeightQParams:
    """Clip at signed order statistics of ``w`` (not of ``|w|``, and not interpolated).

    Per channel (per-channel schemes) or over the whole tensor, of its ``n`` values: ``hi`` is
    the ``k``-th smallest value and ``lo`` the ``k``-th largest, ``k = round(p / 100 * n)``
    (Python's round, half to even) kept within ``1..n`` and at least the median's rank, so that
    ``lo <= hi`` however few values a channel has. ``[lo, hi]`` then goes through the minmax
    formulas: widened to hold 0; symmetric schemes use ``max(-lo, hi)``.
    """
    rows = _channels(w, spec, _per_channel(spec), where)
    n = rows.shape[1]
    k_hi = max((n + 2) // 2, min(n, round(spec.percentile / 100 * n)))
    k_lo = max(1, n + 1 - k_hi)
    lo = rows.kthvalue(k_lo, dim=1).values
    hi = rows.kthvalue(k_hi, dim=1).values
    return _from_range(lo, hi, spec, where)


def mse(w: torch.Tensor, spec: QParamSpec, where: str) -> WeightQParams:
    """Search clipping ratios r of the min/max range; keep, per row, the r with least error
    (the first of equal errors)."""
    rows = _channels(w, spec, _per_channel(spec), where)
    lo, hi = _row_range(rows)
    flat_spec = replace(spec, axis=0)  # rows are channels along axis 0
    ratios = torch.linspace(1.0, 0.01, MSE_CANDIDATES, dtype=torch.float32).tolist()
    ranges = [(lo * r, hi * r) for r in ratios]
    qps = [_from_range(a, b, flat_spec, where) for a, b in ranges]
    search = _searched_errors if _searchable(rows, qps[0]) else _all_errors
    best = search(rows, qps).nan_to_num_(nan=math.inf).argmin(dim=1)  # the first of equals
    index = torch.arange(len(lo))
    return _from_range(
        torch.stack([a for a, _ in ranges], 1)[index, best],
        torch.stack([b for _, b in ranges], 1)[index, best],
        spec,
        where,
    )


def _all_errors(rows: torch.Tensor, qps: list[WeightQParams]) -> torch.Tensor:
    """The squared error of every row under every candidate, (rows, candidates) float64."""
    # summed in an order the thread count does not change: a near tie between two ratios
    # must not go another way under OMP_NUM_THREADS=1
    return torch.stack(
        [
            row_sums_of_squares(fake_quantize(rows, qp).double().sub_(rows), in_place=True)
            for qp in qps
        ],
        1,
    )


def _searchable(rows: torch.Tensor, qp: WeightQParams) -> bool:
    return (
        MSE_SEARCH_COLUMNS <= rows.shape[1] <= MSE_SEARCH_MAX_COLUMNS
        and qp.per_channel
        and not rows.is_cuda
        and qp.storage != torch.int32
        and (not rows.numel() or bool(rows.abs().amax() < _MODERATE))  # and finite
    )


MSE_BLOCK_ELEMENTS = 1 << 19  # values a block of rows runs through every candidate at a time
MSE_SEARCH_COLUMNS = 16  # narrower rows: trying every ratio costs less than the bookkeeping
MSE_SEARCH_MAX_COLUMNS = 2**21  # longer rows: the float32 estimates' margin would pass a half
MSE_CHECK_EVERY = 8  # candidates between two checks of which rows can still win
_MODERATE = 1e15  # |values| below it: their float32 squares summed over a row stay finite


def _searched_errors(rows: torch.Tensor, qps: list[WeightQParams]) -> torch.Tensor:
    """:func:`_all_errors`, the same numbers where a row can still have its least error there
    (inf elsewhere), in blocks of rows that stay in the cache while the candidates run.

    Two passes over a block. The first estimates every candidate's error in float32, within
    a margin for its rounding, and stops a row once the error that clipping alone causes at
    every later candidate exceeds its best so far: no later candidate's codes give a value
    above ``c_hi``, the largest of their largest values (nor below ``c_lo``), so a row's
    values beyond it are off by at least ``value - c_hi`` there. The second computes the exact
    float64 sum only where the estimate's lower end is within reach of the row's least
    estimate's upper end: every other candidate's error is larger than that one's, so the
    least error, and the first of equal ones, stay where they were."""
    channels, n = rows.shape
    margin = 4 * n * 2**-24  # float32 sums of n squares: within n roundings (at most a half)
    tiny = n * 2**-149  # squares below float32's normal range round by up to 2**-150 each
    scales = torch.stack([qp.scale for qp in qps], 1)
    zeros = torch.stack([qp.zero_point for qp in qps], 1)
    top = (qps[0].quant_max - zeros).float().mul_(scales)  # each candidate's largest value
    bottom = (qps[0].quant_min - zeros).float().mul_(scales)
    c_hi = top.flip(1).cummax(1).values.flip(1)[:, 1:]  # of the candidates after each
    c_lo = bottom.flip(1).cummin(1).values.flip(1)[:, 1:]
    zero_free = not bool(zeros.any())
    errors = torch.full((channels, len(qps)), math.inf, dtype=torch.float64)
    step = max(1, MSE_BLOCK_ELEMENTS // max(1, n))
    values = torch.empty(min(channels, step) * n)
    scratch = torch.empty(min(channels, step) * n, dtype=torch.float64)

    def quantized(
        block: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, k: int
    ) -> torch.Tensor:
        out = values[: block.numel()].view(block.shape)
        return fake_quantized_rows(block, s, z, qps[k], out)

    for start in range(0, channels, step):
        part = slice(start, min(channels, start + step))
        whole, s_all, z_all = rows[part], scales[part], None if zero_free else zeros[part]
        estimates = torch.full((len(whole), len(qps)), math.inf)
        at, block = torch.arange(len(whole)), whole  # the rows still searched, their places
        s, z, hi, lo = s_all, z_all, c_hi[part], c_lo[part]
        for k in range(len(qps)):
            zk = None if z is None else z[:, k, None]
            estimates[at, k] = _row_squares(quantized(block, s[:, k, None], zk, k).sub_(block))
            if (k + 1) % MSE_CHECK_EVERY or k + 1 == len(qps):
                continue
            v = values[: block.numel()].view(block.shape)
            bound = _row_squares(torch.sub(block, hi[:, k, None], out=v).clamp_(min=0))
            bound += _row_squares(torch.sub(lo[:, k, None], block, out=v).clamp_(min=0))
            best = estimates[at, : k + 1].amin(1) * (1 + margin) + tiny
            going = bound * (1 - margin) <= best
            if not bool(going.all()):
                at, block, s, hi, lo = at[going], block[going], s[going], hi[going], lo[going]
                z = None if z is None else z[going]
                if not len(at):
                    break
        reach = estimates.amin(1, keepdim=True) * (1 + margin) + tiny
        exact = estimates * (1 - margin) - tiny <= reach  # a row past float32's range: all
        for k in torch.nonzero(exact.any(0)).flatten().tolist():
            at = torch.nonzero(exact[:, k]).flatten()
            block = whole[at]
            zk = None if z_all is None else z_all[at, k, None]
            d = scratch[: block.numel()].view(block.shape)
            d.copy_(quantized(block, s_all[at, k, None], zk, k)).sub_(block.double())
            errors[start + at, k] = row_sums_of_squares(d, in_place=True, as_rows=channels)
    return errors


def _row_squares(rows: torch.Tensor) -> torch.Tensor:
    """float32 sums of squares per row (any order: for a bound with a margin)."""
    return torch.linalg.vector_norm(rows, dim=1).square_()


# Clipping ratios of the min/max range the output observer tries first, then each best ratio's
# neighbours OUTPUT_FINE apart, OUTPUT_NEIGHBOURS either side. With GPTQ's rounding, which makes
# up for rounding errors but not for clipping, the search is GPTQ run per ratio, over the wider
# half.
OUTPUT_COARSE = {"nearest": (1.0, 0.05, 20), "gptq": (1.0, 0.5, 11)}
OUTPUT_FINE = 0.01
OUTPUT_NEIGHBOURS = {"nearest": 4, "gptq": 2}


def output(
    w: torch.Tensor, spec: QParamSpec, where: str, hessian: torch.Tensor | None
) -> WeightQParams:
    """Search clipping ratios r of the min/max range on the output error ``e H eᵀ`` of the
    weight as the spec's rounding quantizes it (nearest, or GPTQ's): a coarse grid, then
    around the best ratio in finer steps; the first of equal errors is kept."""
    check_hessian(w, hessian, where, "observer output")
    assert hessian is not None
    per_channel = _per_channel(spec)
    lo, hi = _row_range(_channels(w, spec, per_channel, where))
    by_row = per_channel and spec.axis % w.dim() == 0  # each channel's error is its row's

    def errors(ratios: list[torch.Tensor]) -> list[torch.Tensor]:
        qps = [_from_range(lo * r, hi * r, spec, where) for r in ratios]
        if spec.rounding == "gptq":
            candidates = gptq_candidates(w, qps, hessian, where=where)
            rows = [output_errors(w, values, hessian) for values in candidates]
        else:
            rows = [output_errors(w, fake_quantize(w, qp), hessian) for qp in qps]
        return rows if by_row else [torch.tensor([total(r)], dtype=torch.float64) for r in rows]

    best_err = torch.full((lo.numel() if by_row else 1,), math.inf, dtype=torch.float64)
    best = torch.ones_like(lo)

    def consider(ratios: list[torch.Tensor]) -> None:
        nonlocal best_err, best
        for ratio, err in zip(ratios, errors(ratios), strict=True):  # in order: ties keep the first
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, ratio, best)

    first, last, count = OUTPUT_COARSE[spec.rounding]
    coarse = torch.linspace(first, last, count, dtype=torch.float32).tolist()
    consider([torch.full_like(lo, r) for r in coarse])
    center, step, n = best.clone(), OUTPUT_FINE, OUTPUT_NEIGHBOURS[spec.rounding]
    consider([(center + k * step).clamp(step, 1.0) for k in [*range(-n, 0), *range(1, n + 1)]])
    return _from_range(lo * best, hi * best, spec, where)


OBSERVERS: dict[str, Callable[[torch.Tensor, QParamSpec, str], WeightQParams]] = {
    "minmax": minmax,
    "percentile": percentile,
    "mse": mse,
}
