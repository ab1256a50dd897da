"""Observers: scale and zero point from a weight, checked against PyTorch's observers."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from refq_cli.errors import SpecError
from refq_cli.quant.observers import observe
from refq_cli.quant.statistics import weight_stats
from refq_cli.spec.spec import Loc, QParamSpec, parse_spec, resolve


def spec(observer="minmax", dtype="qint8", qscheme="per_channel_symmetric", **extra):
    return QParamSpec(
        dtype=dtype, qscheme=qscheme, axis=0, observer=observer, percentile=99.9, **extra
    )


def sqnr(w, qp):
    return weight_stats(w, qp, False)["sqnr_db"]


@pytest.mark.parametrize(
    ("dtype", "qscheme"),
    [
        ("quint8", "per_tensor_affine"),
        ("qint8", "per_tensor_affine"),
        ("qint8", "per_tensor_symmetric"),
        ("quint8", "per_tensor_symmetric"),
        ("quint8", "per_channel_affine"),
        ("qint8", "per_channel_symmetric"),
    ],
)
def test_minmax_matches_torch_ao_observers(dtype, qscheme):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            from torch.ao.quantization.observer import MinMaxObserver, PerChannelMinMaxObserver
        except ImportError:
            pytest.skip("torch.ao observers do not import")
    torch.manual_seed(0)
    w = torch.randn(16, 10) * 0.3 + 0.05
    torch_qscheme = getattr(torch, qscheme)
    if "channel" in qscheme:
        observer = PerChannelMinMaxObserver(
            ch_axis=0, dtype=getattr(torch, dtype), qscheme=torch_qscheme
        )
    else:
        observer = MinMaxObserver(dtype=getattr(torch, dtype), qscheme=torch_qscheme)
    observer(w)
    scale, zero_point = observer.calculate_qparams()
    qp = observe(w, spec("minmax", dtype, qscheme), "w")
    assert torch.equal(qp.scale.reshape(-1), scale.reshape(-1).float())
    assert torch.equal(qp.zero_point.reshape(-1).long(), zero_point.reshape(-1).long())


def test_all_zero_weights_get_the_smallest_scale_not_zero():
    qp = observe(torch.zeros(4, 3), spec("minmax"), "w")
    assert bool((qp.scale == torch.finfo(torch.float32).eps).all())


def laplace(rows=64, cols=256, seed=0):
    """Laplace-distributed weights: the shape trained weights tend to have."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(rows, cols, generator=gen) - 0.5
    return -torch.sign(u) * torch.log1p(-2 * u.abs()) * 0.05


@pytest.mark.parametrize("observer", ["mse", "output"])
def test_the_searched_ratios_do_not_follow_torchs_default_dtype(observer):
    """A program that sets float64 as torch's default dtype gets the scales others get."""
    w = torch.randn(64, 300, generator=torch.Generator().manual_seed(0))
    s = spec(observer, "int4", "per_channel_affine")
    hessian = torch.eye(300, dtype=torch.float64) if observer == "output" else None
    want = observe(w, s, "w", hessian)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = observe(w, s, "w", hessian)
    finally:
        torch.set_default_dtype(before)
    assert torch.equal(got.scale, want.scale) and torch.equal(got.zero_point, want.zero_point)


@pytest.mark.parametrize(
    ("dtype", "qscheme"),
    [
        ("qint8", "per_tensor_affine"),
        ("qint8", "per_tensor_symmetric"),
        ("int4", "per_channel_symmetric"),
        ("int4", "per_channel_affine"),
    ],
)
def test_mse_never_loses_to_minmax(dtype, qscheme):
    for w in (laplace(), torch.rand(32, 64) - 0.5, torch.randn(8, 300) * 0.1):
        by_minmax = sqnr(w, observe(w, spec("minmax", dtype, qscheme), "w"))
        by_mse = sqnr(w, observe(w, spec("mse", dtype, qscheme), "w"))
        assert by_mse >= by_minmax


def test_mse_wins_by_more_than_a_decibel_at_four_bits_on_laplace_weights():
    w = laplace()
    s = ("int4", "per_channel_symmetric")
    assert (
        sqnr(w, observe(w, spec("mse", *s), "w"))
        > sqnr(w, observe(w, spec("minmax", *s), "w")) + 1.0
    )


def test_percentile_clips_outliers():
    w = laplace()
    qp_minmax = observe(w, spec("minmax", "qint8", "per_tensor_symmetric"), "w")
    qp_pct = observe(w, spec("percentile", "qint8", "per_tensor_symmetric"), "w")
    assert float(qp_pct.scale) < float(qp_minmax.scale)
    assert weight_stats(w, qp_pct, False)["clipped_fraction"] > 0


def test_fixed_uses_the_spec_numbers():
    qp = observe(torch.randn(3, 2), spec("fixed", scale=[0.1, 0.2, 0.3], zero_point=0), "w")
    assert torch.equal(qp.scale, torch.tensor([0.1, 0.2, 0.3]))
    assert qp.zero_point.tolist() == [0, 0, 0]
    affine = spec("fixed", "quint8", "per_channel_affine", scale=[0.1, 0.2], zero_point=[3, 250])
    qp = observe(torch.randn(2, 5), affine, "w")
    assert qp.zero_point.dtype == torch.int32 and qp.zero_point.tolist() == [3, 250]
    symmetric = spec("fixed", "quint8", "per_tensor_symmetric", scale=0.5)
    assert observe(torch.randn(2, 5), symmetric, "w").zero_point.tolist() == 128


# --- scales and zero points from a weight of known values ---------------------------------------

QRANGE = {"qint8": (-128, 127), "quint8": (0, 255), "int4": (-8, 7), "uint4": (0, 15)}
SYMMETRIC_ZERO_POINT = {"qint8": 0, "quint8": 128, "int4": 0, "uint4": 8}
# one row (channel) each: both signs with the low side wider, both with the high side wider,
# positive only, negative only
CHANNEL_RANGES = [(-3.0, 1.0), (-0.5, 2.0), (0.25, 4.0), (-5.0, -1.0)]
PER_ROW = 1000


def spread(seed=0):
    """A (4, 1000) weight: each row 1000 evenly spaced values over its range, shuffled."""
    gen = torch.Generator().manual_seed(seed)
    rows = [
        torch.linspace(lo, hi, PER_ROW)[torch.randperm(PER_ROW, generator=gen)]
        for lo, hi in CHANNEL_RANGES
    ]
    return torch.stack(rows)


def by_row(w, qscheme):
    return w if "channel" in qscheme else w.reshape(1, -1)


def from_range(lo, hi, dtype, qscheme):
    """Scale and zero point of each row's range [lo, hi], by PyTorch's observer formulas."""
    qmin, qmax = QRANGE[dtype]
    lo, hi = lo.float().clamp(max=0.0), hi.float().clamp(min=0.0)  # the range holds 0
    if "symmetric" in qscheme:
        scale = torch.maximum(-lo, hi) / ((qmax - qmin) / 2)
        zero_point = torch.full(lo.shape, SYMMETRIC_ZERO_POINT[dtype])
    else:
        scale = (hi - lo) / (qmax - qmin)
        zero_point = (qmin - torch.round(lo / scale)).clamp(qmin, qmax)
    return scale, zero_point.long()


SCHEMES = [
    "per_tensor_symmetric",
    "per_channel_symmetric",
    "per_tensor_affine",
    "per_channel_affine",
]


@pytest.mark.parametrize("qscheme", SCHEMES)
@pytest.mark.parametrize("dtype", ["qint8", "quint8"])
def test_percentile_clips_at_the_signed_percentiles_it_is_given(dtype, qscheme):
    w = spread()
    rows = by_row(w, qscheme)
    scales = []
    for p in (90, 99, 99.9):
        # rows of 1000 and 4000 values: p / 100 * n is whole, and the nearest order statistic
        # of torch.quantile is the one the observer clips at
        lo = torch.quantile(rows, 1 - p / 100, dim=1, interpolation="nearest")
        hi = torch.quantile(rows, p / 100, dim=1, interpolation="nearest")
        scale, zero_point = from_range(lo, hi, dtype, qscheme)
        qp = observe(w, QParamSpec(dtype, qscheme, 0, "percentile", percentile=p), "w")
        assert torch.equal(qp.scale.reshape(-1), scale), p
        assert torch.equal(qp.zero_point.reshape(-1).long(), zero_point), p
        scales.append(scale)
    assert bool((scales[0] < scales[1]).all() and (scales[1] < scales[2]).all())


def test_percentile_by_hand():
    shuffled = torch.randperm(100, generator=torch.Generator().manual_seed(1)).float()
    w = torch.stack([shuffled - 79, 79 - shuffled])  # the values -79..20, and -20..79
    # n = 100: k = p; hi is the k-th smallest value, lo the k-th largest
    cases = {
        # p: ((lo, hi) of row 0, (lo, hi) of row 1, zero points of qint8 per_channel_affine)
        90: ((-69, 10), (-10, 69), [95, -96]),  # 95 = -128 - round(-69 / (79 / 255))
        99: ((-78, 19), (-19, 78), [77, -78]),
    }
    for p, (row0, row1, zero_points) in cases.items():
        affine = observe(w, QParamSpec("qint8", "per_channel_affine", 0, "percentile", p), "w")
        width = torch.tensor([row0[1] - row0[0], row1[1] - row1[0]], dtype=torch.float32)
        assert torch.equal(affine.scale, width / 255)
        assert affine.zero_point.tolist() == zero_points
        sym = observe(w, QParamSpec("qint8", "per_channel_symmetric", 0, "percentile", p), "w")
        widest = torch.tensor([-row0[0], row1[1]], dtype=torch.float32)
        assert torch.equal(sym.scale, widest / 127.5)
        assert sym.zero_point.tolist() == [0, 0]


@pytest.mark.parametrize("observer", ["minmax", "percentile", "mse"])
@pytest.mark.parametrize(
    ("dtype", "qscheme"),
    [
        ("qint8", "per_tensor_symmetric"),
        ("qint8", "per_channel_symmetric"),
        ("quint8", "per_tensor_symmetric"),
        ("quint8", "per_channel_symmetric"),
        ("int4", "per_channel_symmetric"),
        ("uint4", "per_tensor_symmetric"),
    ],
)
def test_symmetric_zero_point_is_the_middle_code_of_the_dtype(observer, dtype, qscheme):
    qp = observe(spread(), spec(observer, dtype, qscheme), "w")
    middle = SYMMETRIC_ZERO_POINT[dtype]
    assert qp.zero_point.dtype == torch.int32
    assert qp.zero_point.tolist() == ([middle] * 4 if "channel" in qscheme else middle)


@pytest.mark.parametrize("observer", ["minmax", "percentile", "mse"])
def test_symmetric_zero_point_of_a_narrowed_unsigned_range_is_its_middle(observer):
    s = spec(observer, "quint8", "per_channel_symmetric", quant_min=0, quant_max=127)
    assert observe(spread(), s, "w").zero_point.tolist() == [63] * 4


@pytest.mark.parametrize("observer", ["minmax", "mse"])
@pytest.mark.parametrize(
    ("dtype", "qscheme"),
    [
        ("quint8", "per_tensor_affine"),
        ("qint8", "per_tensor_affine"),
        ("quint8", "per_channel_affine"),
        ("qint8", "per_channel_affine"),
        ("uint4", "per_channel_affine"),
    ],
)
def test_affine_zero_point_is_where_the_range_puts_zero(observer, dtype, qscheme):
    w = spread()
    rows = by_row(w, qscheme)
    qmin, qmax = QRANGE[dtype]
    lo, hi = rows.amin(dim=1).clamp(max=0.0), rows.amax(dim=1).clamp(min=0.0)
    # the range mse keeps is the min/max one shrunk by a ratio: the zero point stays the same
    expected = (qmin - torch.round(lo * (qmax - qmin) / (hi - lo))).clamp(qmin, qmax).long()
    qp = observe(w, spec(observer, dtype, qscheme), "w")
    assert qp.zero_point.dtype == torch.int32
    assert torch.equal(qp.zero_point.reshape(-1).long(), expected)
    if observer == "minmax":
        assert torch.equal(qp.scale.reshape(-1), from_range(lo, hi, dtype, qscheme)[0])
    if "channel" in qscheme:  # positive only: 0 at qmin; negative only: 0 at qmax
        assert qp.zero_point.tolist()[2:] == [qmin, qmax]


def test_fixed_errors_point_at_the_setting():
    text = (
        "version: 1\nrules:\n  - match: enc\n    weights:\n"
        "      weight_hh: {observer: fixed, scale: [0.1, 0.2], zero_point: 0}\n"
    )
    plan = resolve(parse_spec(text, "q.yaml"), {"enc": ["weight_hh"]})["enc"]
    with pytest.raises(
        SpecError,
        match=r"^q.yaml:5:43: enc.weight_hh: per-channel scale has 2 "
        r"entries but the weight has 4 channels",
    ):
        observe(torch.zeros(4, 3), plan.weights["weight_hh"], "enc.weight_hh")
    bad_zp = spec(
        "fixed",
        "quint8",
        "per_tensor_affine",
        scale=0.1,
        zero_point=300,
        origin={"zero_point": Loc("q.yaml", 7, 3)},
    )
    with pytest.raises(SpecError, match=r"^q.yaml:7:3: w: zero_point must lie in \[0, 255\]"):
        observe(torch.zeros(2, 2), bad_zp, "w")


def test_axis_out_of_range_points_at_axis():
    s = spec("minmax", origin={"axis": Loc("q.yaml", 4, 9)})
    s = QParamSpec(**{**s.__dict__, "axis": 3})
    with pytest.raises(SpecError, match=r"^q.yaml:4:9: w: axis 3 is out of range"):
        observe(torch.zeros(2, 2), s, "w")


@pytest.mark.parametrize(("values", "p"), [([-1.0, 1.0], 70), ([-2.0, -1.0, 1.0, 2.0], 55)])
def test_percentile_never_crosses_on_short_channels(values, p):
    # k = round(p/100 * n) below the median's rank once put lo above hi: [-1, 1] at p=70
    # collapsed to a scale of float32's eps.
    spec = QParamSpec("quint8", "per_channel_affine", 0, "percentile", p)
    qp = observe(torch.tensor([values]), spec, "w")
    lo, hi = sorted(values)[(len(values) - 1) // 2], sorted(values)[len(values) // 2]
    want_lo, want_hi = min(lo, 0.0), max(hi, 0.0)
    assert qp.scale.item() == pytest.approx((want_hi - want_lo) / 255, rel=1e-6)
    assert qp.scale.item() > 1e-3


# --- the mse search: the exhaustive search's result, found with less work ----------------------


def exhaustive_mse(w, s):
    """The mse observer as first written: every ratio tried on the whole weight, the first of
    equal errors kept (a strict < over the ratios in order)."""
    from dataclasses import replace

    from refq_cli.quant import observers
    from refq_cli.quant.numerics import fake_quantize, row_sums_of_squares

    rows = observers._channels(w, s, observers._per_channel(s), "w")
    lo, hi = observers._row_range(rows)
    best_err = torch.full_like(lo, float("inf"), dtype=torch.float64)
    best_lo, best_hi = lo.clone(), hi.clone()
    for r in torch.linspace(1.0, 0.01, observers.MSE_CANDIDATES).tolist():
        qp = observers._from_range(lo * r, hi * r, replace(s, axis=0), "w")
        err = row_sums_of_squares(fake_quantize(rows, qp).double().sub_(rows), in_place=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo, best_hi = (
            torch.where(better, lo * r, best_lo),
            torch.where(better, hi * r, best_hi),
        )
    return observers._from_range(best_lo, best_hi, s, "w")


MSE_SCHEMES = [
    ("qint8", "per_channel_symmetric", {}),
    ("quint8", "per_channel_affine", {}),
    ("quint8", "per_channel_symmetric", {}),
    ("int4", "per_channel_symmetric", {}),
    ("int4", "per_channel_affine", {}),
    ("uint4", "per_channel_affine", {}),
    ("int4", "per_channel_symmetric", {"quant_min": -4, "quant_max": 3}),
    ("qint8", "per_tensor_affine", {}),
    ("qint32", "per_channel_symmetric", {}),
]


@st.composite
def mse_weights(draw):
    rows, cols = draw(st.integers(1, 40)), draw(st.integers(1, 300))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    kind = draw(st.sampled_from(["normal", "laplace", "uniform", "outliers", "mixed"]))
    w = torch.randn(rows, cols, generator=gen)
    if kind == "laplace":
        w = torch.sign(w) * torch.rand(rows, cols, generator=gen).log().neg()
    elif kind == "uniform":
        w = torch.rand(rows, cols, generator=gen) * 2 - 1
    elif kind == "outliers":
        w[:, :: max(1, cols // 3)] *= 40
    elif kind == "mixed":  # constant, zero, one-sided and tiny rows among normal ones
        w[0] = 0.5
        w[rows // 2] = 0.0
        w[-1] = w[-1].abs()
        w[rows // 3] *= 1e-30
    return w * draw(st.sampled_from([1.0, 1e-3, 1e6, 1e16]))


@given(mse_weights(), st.sampled_from(MSE_SCHEMES), st.sampled_from([1 << 18, 64, 1]))
def test_mse_chooses_what_the_exhaustive_search_chooses(w, scheme, block_elements):
    from refq_cli.quant import observers

    dtype, qscheme, extra = scheme
    s = spec("mse", dtype, qscheme, **extra)
    observers_block = observers.MSE_BLOCK_ELEMENTS
    observers.MSE_BLOCK_ELEMENTS = block_elements  # several blocks, some of one row
    try:
        got = observe(w, s, "w")
    finally:
        observers.MSE_BLOCK_ELEMENTS = observers_block
    want = exhaustive_mse(w, s)
    assert torch.equal(got.scale, want.scale) and torch.equal(got.zero_point, want.zero_point)


@pytest.mark.parametrize("block_elements", [1 << 18, 256])
@pytest.mark.parametrize("ratios", ["grid", "not narrowing"])
def test_the_search_computes_the_exhaustive_errors_and_stops_only_rows_that_cannot_win(
    monkeypatch, block_elements, ratios
):
    from dataclasses import replace

    from refq_cli.quant import observers

    monkeypatch.setattr(observers, "MSE_BLOCK_ELEMENTS", block_elements)  # 256: a row a block
    w = torch.cat([laplace(48, 256), torch.rand(48, 256) - 0.5, torch.randn(48, 256)])
    grid = torch.linspace(1.0, 0.01, observers.MSE_CANDIDATES).tolist()
    if ratios == "not narrowing":  # a wide range after narrow ones: the bound must see it
        grid = [1.0, 0.6, 0.5, 0.45, 0.4, 0.35, 0.985, 0.99, 0.3]
    for dtype in ("qint8", "int4"):
        s = spec("mse", dtype, "per_channel_symmetric")
        rows = observers._channels(w, s, True, "w")
        lo, hi = observers._row_range(rows)
        qps = [observers._from_range(lo * r, hi * r, replace(s, axis=0), "w") for r in grid]
        searched, every = observers._searched_errors(rows, qps), observers._all_errors(rows, qps)
        tried = torch.isfinite(searched)
        assert torch.equal(searched[tried], every[tried])  # the same numbers, bit for bit
        best = every.amin(dim=1, keepdim=True)
        assert bool((every[~tried] > best.expand_as(every)[~tried]).all())  # none would win
        if ratios == "grid":
            assert tried.float().mean() < 0.5  # and most of the work is skipped
