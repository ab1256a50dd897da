"""Calibrated quantization's math: the output observer and GPTQ's roundings (quant.calibrated)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from refq_cli.errors import RefqError, SpecError
from refq_cli.quant.calibrated import HessianSum, gptq_values, output_errors, total
from refq_cli.quant.numerics import DTYPES, dequantize, fake_quantize, quantize
from refq_cli.quant.observers import observe
from refq_cli.spec.spec import QParamSpec

SCHEMES = [
    "per_tensor_affine",
    "per_tensor_symmetric",
    "per_channel_affine",
    "per_channel_symmetric",
]
DTYPE_NAMES = sorted(DTYPES)


def spec(dtype="int4", qscheme="per_channel_symmetric", observer="minmax", axis=0, **kw):
    return QParamSpec(
        dtype=dtype, qscheme=qscheme, axis=axis, observer=observer, percentile=99.9, **kw
    )


def correlated(rows: int, features: int, seed: int = 0) -> torch.Tensor:
    """Inputs whose features are correlated, as a recurrent layer's hidden states are."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.randn(features, features, generator=gen)
    return torch.tanh(torch.randn(rows, features, generator=gen) @ basis / features**0.5)


def hessian(x: torch.Tensor) -> torch.Tensor:
    h = HessianSum(x.shape[-1])
    h.add(x)
    return h.sum


def weight(out: int, features: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(out, features, generator=torch.Generator().manual_seed(seed)) * 0.3


def test_hessian_sums_the_rows_outer_products_in_float64():
    x = correlated(10_000, 6)  # more rows than one chunk
    h = HessianSum(6)
    h.add(x[:3000])
    h.add(x[3000:].reshape(10, 700, 6))
    assert h.rows == 10_000 and h.sum.dtype == torch.float64
    assert torch.allclose(h.sum, x.double().T @ x.double(), rtol=1e-12)


def test_output_errors_are_e_h_e_per_row_on_h_scaled_to_a_mean_diagonal_of_1():
    w, x = weight(5, 7), correlated(50, 7)
    values = fake_quantize(w, observe(w, spec(), "w"))
    h = hessian(x)
    expected = ((w - values).double() @ x.double().T).pow(2).sum(1) / h.diagonal().mean()
    assert torch.allclose(output_errors(w, values, h), expected, rtol=1e-5)
    for scale in (1e-30, 1e20):  # the same errors whatever the inputs' magnitude
        assert torch.allclose(output_errors(w, values, h * scale), expected, rtol=1e-5)


def test_gptq_holds_its_promise_on_inputs_with_a_large_mean():
    # a tiny spread around a large mean: float32 sums of e H eᵀ cancel badly (red team)
    w = weight(48, 16, seed=3)
    x = 100 + 0.01 * torch.randn(160, 16, generator=torch.Generator().manual_seed(3))
    h = hessian(x)
    qp = observe(w, spec(observer="output"), "w", h)
    values, nearest = gptq_values(w, qp, h), fake_quantize(w, qp)
    rows = x.double() @ (w - values).double().T, x.double() @ (w - nearest).double().T
    assert bool((rows[0].pow(2).sum(0) <= rows[1].pow(2).sum(0) * (1 + 1e-9)).all())


@given(
    out=st.integers(1, 12),
    features=st.integers(1, 24),
    samples=st.integers(1, 60),
    dtype=st.sampled_from(DTYPE_NAMES),
    qscheme=st.sampled_from(SCHEMES),
    axis=st.sampled_from([0, 1]),
    seed=st.integers(0, 2**16),
)
def test_gptq_never_has_a_larger_output_error_than_nearest_rounding(
    out, features, samples, dtype, qscheme, axis, seed
):
    w, x = weight(out, features, seed), correlated(samples, features, seed + 1)
    h = hessian(x)
    qp = observe(w, spec(dtype, qscheme, axis=axis), "w")
    values = gptq_values(w, qp, h)
    nearest = fake_quantize(w, qp)
    # per row (each output channel) and so in total, on the calibration inputs
    assert bool((output_errors(w, values, h) <= output_errors(w, nearest, h)).all())
    codes = quantize(values, qp)
    assert qp.quant_min <= int(codes.min()) and int(codes.max()) <= qp.quant_max
    # on the grid: the values are their codes' values, and quantizing them again is the identity
    assert torch.equal(dequantize(codes, qp), values)
    assert torch.equal(fake_quantize(values, qp), values)
    if dtype != "qint32":  # beyond 2**24, 32-bit codes' paths differ (quant.numerics)
        assert torch.equal(fake_quantize(values, qp, decomposed=True), values)


@pytest.mark.parametrize("dtype", ["int4", "qint8"])
def test_gptq_lowers_the_output_error_on_correlated_inputs(dtype):
    w, x = weight(64, 48), correlated(400, 48)
    h = hessian(x)
    qp = observe(w, spec(dtype), "w")
    gptq = total(output_errors(w, gptq_values(w, qp, h), h))
    nearest = total(output_errors(w, fake_quantize(w, qp), h))
    assert gptq < 0.7 * nearest, (gptq, nearest)


def test_gptq_with_inputs_the_calibration_never_fed():
    w, x = weight(8, 10), correlated(30, 10)
    x[:, 3] = 0  # a feature that never occurred: its Hessian row and column are 0
    h = hessian(x)
    qp = observe(w, spec(), "w")
    values = gptq_values(w, qp, h)
    assert bool(torch.isfinite(values).all())
    assert bool((output_errors(w, values, h) <= output_errors(w, fake_quantize(w, qp), h)).all())
    # no input fed at all: nothing to spread errors through, so GPTQ is rounding to nearest
    # (without unit diagonals for dead inputs this was refused as an overflow)
    assert torch.equal(
        gptq_values(w, qp, torch.zeros(10, 10, dtype=torch.float64)), fake_quantize(w, qp)
    )


def test_gptq_blocks_are_the_same_math_as_one_column_at_a_time(monkeypatch):
    # more columns than a block, so the update between blocks matters
    from refq_cli.quant import calibrated

    w, x = weight(64, 300), correlated(900, 300)
    h = hessian(x)
    qp = observe(w, spec(), "w")
    blocked = gptq_values(w, qp, h)
    monkeypatch.setattr(calibrated, "GPTQ_BLOCK", 1)
    one_by_one = gptq_values(w, qp, h)
    assert (blocked == one_by_one).float().mean() > 0.999  # last bits may round a code apart
    a, b = total(output_errors(w, blocked, h)), total(output_errors(w, one_by_one, h))
    assert abs(a - b) <= 1e-3 * b, (a, b)


def test_gptq_is_the_same_whatever_the_thread_count():
    w, x = weight(256, 160), correlated(800, 160)
    h = hessian(x)
    qp = observe(w, spec(), "w")
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            out_qp = observe(w, spec(observer="output"), "w", hessian(x))
            results.append((gptq_values(w, qp, h), out_qp.scale))
    finally:
        torch.set_num_threads(threads)
    for values, scale in results[1:]:
        assert torch.equal(values, results[0][0]) and torch.equal(scale, results[0][1])


@given(
    out=st.integers(1, 10),
    features=st.integers(1, 20),
    qscheme=st.sampled_from(SCHEMES),
    axis=st.sampled_from([0, 1]),
    seed=st.integers(0, 2**16),
)
def test_output_observer_is_never_worse_than_minmax_on_the_output_error(
    out, features, qscheme, axis, seed
):
    # the search starts at the min/max range (ratio 1) and keeps a ratio only when it is better
    w, x = weight(out, features, seed), correlated(40, features, seed + 1)
    h = hessian(x)
    chosen = fake_quantize(w, observe(w, spec("int4", qscheme, "output", axis), "w", h))
    minmax = fake_quantize(w, observe(w, spec("int4", qscheme, "minmax", axis), "w"))
    if qscheme.startswith("per_channel") and axis == 0:
        assert bool((output_errors(w, chosen, h) <= output_errors(w, minmax, h)).all())
    else:
        assert total(output_errors(w, chosen, h)) <= total(output_errors(w, minmax, h))


def test_output_observer_beats_mse_on_the_output_error():
    w, x = weight(64, 48), correlated(400, 48)
    h = hessian(x)
    chosen = fake_quantize(w, observe(w, spec(observer="output"), "w", h))
    mse = fake_quantize(w, observe(w, spec(observer="mse"), "w"))
    assert total(output_errors(w, chosen, h)) < total(output_errors(w, mse, h))


@pytest.mark.parametrize(
    ("settings", "named"),
    [({"observer": "output"}, "observer output"), ({"rounding": "gptq"}, "rounding gptq")],
)
def test_calibrated_settings_without_inputs_say_so(settings, named):
    w = weight(4, 5)
    s = spec(**{"observer": "minmax", **settings})
    with pytest.raises(RefqError, match=f"{named} needs calibration inputs"):
        qp = observe(w, s, "m.weight_hh")
        gptq_values(w, qp, None, where="m.weight_hh")  # type: ignore[arg-type]


def test_a_hessian_of_the_wrong_size_is_refused():
    w = weight(4, 5)
    with pytest.raises(
        SpecError, match=r"\(3, 3\) Hessian does not fit a weight of shape \(4, 5\)"
    ):
        observe(w, spec(observer="output"), "m.weight_ih", torch.eye(3, dtype=torch.float64))
