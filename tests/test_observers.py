"""Observers: scale and zero point from a weight, checked against PyTorch's observers."""

from __future__ import annotations

import warnings

import pytest
import torch

from refq_cli.errors import SpecError
from refq_cli.pipeline.report import weight_stats
from refq_cli.quant.observers import observe
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
