"""Per-weight statistics, gathered block by block, against the same sums taken at once."""

from __future__ import annotations

import math

import pytest
import torch

from refq_cli.errors import QParamsError
from refq_cli.quant import numerics as quant
from refq_cli.quant.numerics import WeightQParams, fake_quantize
from refq_cli.quant.statistics import quantize_and_measure


def brute_force(w, qp):
    fq = fake_quantize(w, qp).double()
    shape = [1] * w.dim()
    if qp.per_channel:
        shape[qp.axis] = -1
    step = qp.scale.reshape(shape).double()
    zero = qp.zero_point.reshape(shape).double()
    low = ((qp.quant_min - zero - 0.5) * step).float()
    high = ((qp.quant_max - zero + 0.5) * step).float()
    error = w.double() - fq
    return {
        "sqnr_db": 10 * math.log10(float(w.double().pow(2).sum() / error.pow(2).sum())),
        "max_abs_error": float(error.abs().max()),
        "clipped": int(((w < low) | (w > high)).sum()),
    }


@pytest.mark.parametrize(
    ("shape", "qscheme", "axis"),
    [
        ((40, 9), "per_channel_affine", 0),
        ((40, 9), "per_channel_affine", 1),
        ((40, 9), "per_tensor_affine", 0),
        ((40,), "per_channel_affine", 0),
        ((6, 5, 4), "per_channel_affine", 1),
    ],
    ids=["rows", "columns", "per-tensor", "1-d", "3-d"],
)
def test_block_statistics_equal_whole_weight_ones(monkeypatch, shape, qscheme, axis):
    monkeypatch.setattr(quant, "BLOCK_ELEMENTS", 7)  # many small blocks, a ragged last one
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(shape, generator=gen)
    per_channel = qscheme == "per_channel_affine"
    channels = shape[axis] if per_channel else 1
    scale = torch.rand(channels, generator=gen) * 0.01 + 0.004  # clips the tails of w
    zero_point = torch.randint(-20, 20, (channels,), generator=gen)
    qp = WeightQParams.create(
        qscheme=qscheme,
        dtype="qint8",
        scale=scale if per_channel else scale[0],
        zero_point=zero_point if per_channel else zero_point[0],
        axis=axis,
    )
    values, stats = quantize_and_measure(w, qp, False)
    expected = brute_force(w, qp)
    assert torch.equal(values, fake_quantize(w, qp))
    assert expected["clipped"] > 0
    assert stats["clipped_fraction"] == expected["clipped"] / w.numel()
    assert stats["max_abs_error"] == pytest.approx(expected["max_abs_error"], rel=1e-6)
    assert stats["sqnr_db"] == pytest.approx(expected["sqnr_db"], abs=1e-5)


def test_sqnr_over_full_size_blocks_matches_float64_sums():
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(2048, 640, generator=gen) * 0.02 + 0.01  # five blocks, none centred
    qp = WeightQParams.create(
        qscheme="per_channel_symmetric", dtype="qint8", scale=w.abs().amax(1) / 127.5, axis=0
    )
    stats = quantize_and_measure(w, qp, False)[1]
    assert stats["sqnr_db"] == pytest.approx(brute_force(w, qp)["sqnr_db"], abs=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_without_values_the_statistics_are_the_same(dtype):
    """--probe-steps 0 keeps no fake-quantized copy of a weight, and its row of the report (and
    so the artifact's bytes) stays what it was: the error is still of the values in the
    weight's dtype."""
    gen = torch.Generator().manual_seed(5)
    w = (torch.randn(700, 300, generator=gen) * 0.05).to(dtype)
    qp = WeightQParams.create(
        qscheme="per_channel_affine",
        dtype="quint8",
        scale=w.float().abs().amax(1) / 100,
        zero_point=torch.full((700,), 128),
        axis=0,
    )
    values, stats = quantize_and_measure(w, qp, False)
    assert values is not None and values.dtype == dtype
    assert stats["max_abs_error"] == (w.float() - values.float()).abs().max().item()
    assert quantize_and_measure(w, qp, False, values=False) == (None, stats)


def test_weights_without_rows_and_bad_axes():
    qp = WeightQParams.create(qscheme="per_tensor_symmetric", dtype="qint8", scale=0.1)
    values, stats = quantize_and_measure(torch.empty(0, 3), qp, False)
    assert values.shape == (0, 3) and stats["sqnr_db"] is None and stats["clipped_fraction"] == 0
    per_channel = WeightQParams.create(
        qscheme="per_channel_symmetric", dtype="qint8", scale=torch.ones(3), axis=2
    )
    with pytest.raises(QParamsError, match="axis 2 is out of range"):
        quantize_and_measure(torch.ones(3, 3), per_channel, False)


def test_codes_reach_the_caller_in_row_major_order(monkeypatch):
    monkeypatch.setattr(quant, "BLOCK_ELEMENTS", 10)
    w = torch.randn(9, 4)
    qp = WeightQParams.create(qscheme="per_tensor_symmetric", dtype="qint8", scale=0.01)
    blocks = []
    quantize_and_measure(w, qp, False, lambda codes: blocks.append(codes.clone()))
    assert len(blocks) == 5
    assert torch.equal(torch.cat(blocks), quant.quantize(w, qp))


def test_an_unclipped_weight_reports_no_clipping():
    w = torch.randn(16, 8)
    scale = w.abs().amax(1) / 100  # the range fits well inside the codes
    qp = WeightQParams.create(qscheme="per_channel_symmetric", dtype="qint8", scale=scale, axis=0)
    assert quantize_and_measure(w, qp, False)[1]["clipped_fraction"] == 0
