"""Calibrated quantization: roundings chosen on a layer's output error, not the weight's.

A weight ``W`` (out x in) multiplies the rows ``x`` of its inputs: ``y = x Wᵀ``. Quantized to
``Ŵ``, every output row moves by ``x eᵀ`` with ``e = W - Ŵ``, and over the calibration rows
``X`` the output error of output channel ``i`` is ``e_i H e_iᵀ`` with ``H = XᵀX`` (the
Hessian of the squared output error). For ``weight_ih`` the rows are the layer's inputs at
every step, for ``weight_hh`` the hidden states ``h_{t-1}`` that multiply it, for an LSTM's
``weight_hr`` the cell outputs ``o_t * tanh(c_t)`` it projects.

* :class:`HessianSum` accumulates ``XᵀX`` in float64, in an order the thread count does not
  change.
* :func:`output_errors`: ``e_i H e_iᵀ`` per row, which the ``output`` observer
  (:mod:`refq_cli.quant.observers`) minimises over clipping ranges.
* :func:`gptq_values`: GPTQ (Frantar et al., 2022): columns quantized one at a time, in order of
  decreasing ``H_jj`` (act-order), each column's rounding error spread over the columns not
  yet quantized through the inverse Hessian (damped by 1% of its mean diagonal), so the output
  error stays small; the scale and zero point are the observer's and do not change. Each row
  keeps the nearer rounding wherever GPTQ's output error would exceed it, so GPTQ is never
  worse than rounding to nearest on the calibration inputs.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch

from refq_cli.errors import QParamsError, RefqError
from refq_cli.quant.numerics import WeightQParams, dequantize, fake_quantize, row_sums

GPTQ_DAMPING = 0.01  # of the Hessian's mean diagonal, added to its diagonal
GPTQ_BLOCK = 128  # columns updated lazily together (the same math for any size; last bits vary)
GPTQ_BATCH_ELEMENTS = 1 << 22  # weight values GPTQ runs at once, candidates' rows stacked
_CHUNK_ROWS = 4096  # rows added to a Hessian at a time
_OVERFLOW = (
    "the calibration inputs' XᵀX overflows (values near the end of the float range); record "
    "inputs of the magnitudes the model sees"
)


class HessianSum:
    """``XᵀX`` over the rows ``X`` that a weight multiplies, added chunk by chunk in float64."""

    def __init__(self, features: int, device: torch.device | str = "cpu") -> None:
        self.sum = torch.zeros(features, features, dtype=torch.float64, device=device)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        """Add the rows of ``x`` (any shape whose last dimension is the features)."""
        # float64: inputs with a large mean and a small spread (a bias-like feature) keep
        # their spread, which float32 products lose
        rows = x.detach().reshape(-1, self.sum.shape[0]).to(self.sum.device, torch.float64)
        for chunk in rows.split(_CHUNK_ROWS):
            self.sum.addmm_(chunk.T, chunk)
        self.rows += rows.shape[0]


def output_errors(w: torch.Tensor, values: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """``e_i H e_iᵀ`` for each row ``e_i`` of ``w - values``, one per row of ``w``, with ``H``
    scaled to a mean diagonal of 1 (the same order of rows, whatever the inputs' magnitude):
    computed in float32, for a search (:func:`error_gain` compares exactly), returned as
    float64."""
    h = hessian.to(w.device, torch.float64)
    mean = float(h.diagonal().mean())
    h = (h / mean if mean > 0 else h).float()
    e = w.detach().float() - values.detach().float()
    he = e @ h
    # in place in the working dtype: a sum the thread count does not change
    return row_sums(he.mul_(e), in_place=True).double()


def error_gain(
    w: torch.Tensor, values: torch.Tensor, other: torch.Tensor, hessian: torch.Tensor
) -> torch.Tensor:
    """Per row, how much larger the output error of ``values`` is than that of ``other``:
    ``e H eᵀ - f H fᵀ = (e - f) H (e + f)ᵀ``, in float64 (one product, and ``e - f`` is the
    exact difference of the two roundings), on H scaled to a mean diagonal of 1."""
    w64 = w.detach().double()
    e, f = w64 - values.detach().double(), w64 - other.detach().double()
    h = hessian.to(w.device, torch.float64)
    mean = float(h.diagonal().mean())
    h = h / mean if mean > 0 else h
    return row_sums(((e - f) @ h).mul_(e + f), in_place=True)


def check_hessian(w: torch.Tensor, hessian: torch.Tensor | None, where: str, what: str) -> None:
    """Refuse a missing Hessian (no calibration inputs) or one of the wrong size."""
    if hessian is None:
        raise QParamsError(
            f"{where}: {what} needs calibration inputs; record them with "
            "refq_cli.record_calibration and pass them with --calibration (calibration= in "
            "Python)",
            field="rounding" if what.startswith("rounding") else "observer",
        )
    if not bool(torch.isfinite(hessian).all()):
        raise RefqError(f"{where}: {_OVERFLOW}")
    if w.dim() != 2 or tuple(hessian.shape) != (w.shape[1], w.shape[1]):
        raise QParamsError(
            f"{where}: a {tuple(hessian.shape)} Hessian does not fit a weight of shape "
            f"{tuple(w.shape)}"
        )


def gptq_values(
    w: torch.Tensor,
    qp: WeightQParams,
    hessian: torch.Tensor,
    *,
    where: str = "weight",
) -> torch.Tensor:
    """The weight's values (float32, on ``qp``'s grid) with GPTQ's roundings: each row GPTQ's
    or the nearest rounding's, whichever has the smaller output error ``e H eᵀ``."""
    return next(gptq_candidates(w, [qp], hessian, where=where))


def gptq_candidates(
    w: torch.Tensor,
    qparams: Sequence[WeightQParams],
    hessian: torch.Tensor,
    *,
    where: str = "weight",
) -> Iterator[torch.Tensor]:
    """:func:`gptq_values` for each of several quantization parameters (an observer's
    candidates), in their order: one inverse Hessian for all, their rows run
    together, as many as fit :data:`GPTQ_BATCH_ELEMENTS` at a time. Rows do not interact in
    GPTQ: each row's result is what it would be alone."""
    check_hessian(w, hessian, where, "rounding gptq")
    weight = w.detach().float()
    for qp in qparams:
        qp.check_weight(weight, where)
    factor, order = _inverse_factor(hessian, GPTQ_DAMPING, where)
    per_batch = max(1, GPTQ_BATCH_ELEMENTS // max(1, weight.numel()))
    for start in range(0, len(qparams), per_batch):
        batch = qparams[start : start + per_batch]
        scale = torch.cat([qp._along_axis(qp.scale, 2).expand(weight.shape) for qp in batch])
        zero = torch.cat([qp._along_axis(qp.zero_point, 2).expand(weight.shape) for qp in batch])
        rows = weight.expand(len(batch), *weight.shape).reshape(-1, weight.shape[1])
        codes = _gptq_codes(rows, scale.float(), zero.float(), batch[0], factor, order)
        for qp, q in zip(batch, codes.split(weight.shape[0]), strict=True):
            values = dequantize(q.to(qp.storage), qp)
            nearest = fake_quantize(weight, qp)
            worse = error_gain(weight, values, nearest, hessian) > 0
            yield torch.where(worse.unsqueeze(1), nearest, values)


def _inverse_factor(
    hessian: torch.Tensor, damping: float, where: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The upper Cholesky factor of the damped Hessian's inverse, in act-order (columns by
    decreasing ``H_jj``), and that order."""
    h = hessian.detach().to(torch.float64, copy=True)
    diagonal = h.diagonal()
    dead = diagonal <= 0  # inputs the calibration never fed: nothing to spread through them
    h[dead, dead] = 1.0
    order = torch.argsort(diagonal, descending=True, stable=True)  # act-order
    h.diagonal().add_(damping * diagonal.mean())
    h = h[order][:, order]
    try:
        inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
        factor = torch.linalg.cholesky(inverse, upper=True).float()
    except torch.linalg.LinAlgError:
        factor = None
    if factor is None or not bool(torch.isfinite(factor).all()):
        raise RefqError(f"{where}: {_OVERFLOW}")
    return factor, order


def _gptq_codes(
    w: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    qp: WeightQParams,
    factor: torch.Tensor,
    order: torch.Tensor,
) -> torch.Tensor:
    """GPTQ's codes (float32 whole numbers) of the rows of ``w``, each element with its own
    scale and zero point; worked on transposed, so that a column is contiguous."""
    device = w.device
    u = factor.to(device)
    work = w[:, order].T.contiguous()  # (in, rows)
    scale, zero = scale[:, order].T.contiguous(), zero[:, order].T.contiguous()
    codes = torch.empty_like(work)
    columns = work.shape[0]
    for start in range(0, columns, GPTQ_BLOCK):
        stop = min(start + GPTQ_BLOCK, columns)
        errors = torch.empty(stop - start, work.shape[1], device=device)
        for j in range(start, stop):
            col, code = work[j], codes[j]
            torch.div(col, scale[j], out=code).round_().add_(zero[j])
            code.clamp_(qp.quant_min, qp.quant_max)
            err = errors[j - start]
            torch.sub(code, zero[j], out=err).mul_(scale[j]).neg_().add_(col).div_(u[j, j])
            work[j:stop].addr_(u[j, j:stop], err, alpha=-1)
        work[stop:].addmm_(u[start:stop, stop:].T, errors, alpha=-1)
    restored = torch.empty_like(codes)
    restored[order] = codes
    return restored.T


def total(errors: torch.Tensor) -> float:
    """The sum of per-row errors, the same whatever the thread count."""
    return math.fsum(errors.tolist())
