"""Quantization math: validation, exact numerics against PyTorch's kernels, properties."""

from __future__ import annotations

import ast
import dataclasses
import struct
import warnings
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from refq_cli.errors import QParamsError
from refq_cli.quant import numerics as quant
from refq_cli.quant.numerics import (
    DTYPES,
    QuantizedWeight,
    WeightQParams,
    _fma_f32,
    dequantize,
    fake_quantize,
    quantize,
)

ORACLE_DTYPES = ["quint8", "qint8", "qint32"]
ALL_DTYPES = list(DTYPES)


def make_qparams(dtype, per_channel, rows, gen, scale_lo=1e-3, scale_hi=0.05):
    d = DTYPES[dtype]
    lo, hi = (d.qmin, d.qmax) if dtype != "qint32" else (-1000, 1000)
    n = rows if per_channel else 1
    scale = torch.rand(n, generator=gen) * (scale_hi - scale_lo) + scale_lo
    zp = torch.randint(lo, hi + 1, (n,), generator=gen, dtype=torch.int32)
    return WeightQParams.create(
        qscheme="per_channel_affine" if per_channel else "per_tensor_affine",
        dtype=dtype,
        scale=scale if per_channel else scale[0],
        zero_point=zp if per_channel else zp[0],
        axis=0,
    )


def weights_with_ties(qp, rows, cols, gen):
    """Random weights, half of them placed exactly on (or one float off) a rounding tie."""
    scale = qp.scale.reshape(-1, 1) if qp.per_channel else qp.scale
    w = torch.randn(rows, cols, generator=gen) * scale * 60
    k = torch.randint(-100, 100, (rows, cols), generator=gen).float()
    ties = (k + 0.5) * scale
    pick = torch.rand(rows, cols, generator=gen)
    w = torch.where(pick < 0.4, ties, w)
    return torch.where(pick > 0.9, torch.nextafter(ties, torch.zeros_like(ties)), w)


def torch_oracle(w, qp):
    """PyTorch's own quantized kernels (deprecated in 2.13, used here as the oracle only)."""
    if not hasattr(torch, "quantize_per_channel") or not hasattr(torch, qp.dtype):
        pytest.skip("this torch has no quantized tensors to compare with")
    qdtype = getattr(torch, qp.dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if qp.per_channel:
            q = torch.quantize_per_channel(w, qp.scale, qp.zero_point, qp.axis, qdtype)
        else:
            q = torch.quantize_per_tensor(w, qp.scale, qp.zero_point, qdtype)
        return q.int_repr(), q.dequantize()


@pytest.mark.parametrize("per_channel", [False, True], ids=["per_tensor", "per_channel"])
@pytest.mark.parametrize("dtype", ORACLE_DTYPES)
def test_default_path_matches_torch_kernels_on_ties(dtype, per_channel):
    gen = torch.Generator().manual_seed(7)
    for cols in [*range(1, 40), 63, 64, 65, 257]:  # vector bodies and scalar tails alike
        rows = int(torch.randint(1, 5, (), generator=gen))
        qp = make_qparams(dtype, per_channel, rows, gen)
        w = weights_with_ties(qp, rows, cols, gen)
        codes, values = torch_oracle(w, qp)
        ours = quantize(w, qp)
        assert ours.dtype == codes.dtype
        assert torch.equal(ours, codes), f"codes differ at cols={cols}"
        assert torch.equal(fake_quantize(w, qp), values), f"values differ at cols={cols}"


@pytest.mark.parametrize("per_channel", [False, True], ids=["per_tensor", "per_channel"])
@pytest.mark.parametrize("dtype", ORACLE_DTYPES)
def test_decomposed_path_matches_torch_decomposed_ops(ao, dtype, per_channel):
    _, ao_utils = ao
    gen = torch.Generator().manual_seed(11)
    qscheme = torch.per_channel_affine if per_channel else torch.per_tensor_affine
    for cols in [1, 7, 8, 9, 31, 64, 100]:
        rows = 3
        qp = make_qparams(dtype, per_channel, rows, gen)
        w = weights_with_ties(qp, rows, cols, gen)
        args = (w, qscheme, getattr(torch, qp.dtype), qp.scale, qp.zero_point, 0, None, None)
        codes = ao_utils._quantize_weight_decomposed(*args)
        values = ao_utils._quantize_and_dequantize_weight_decomposed(*args)
        assert torch.equal(quantize(w, qp, decomposed=True), codes)
        assert torch.equal(fake_quantize(w, qp, decomposed=True), values)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def on_cuda(qp):
    return dataclasses.replace(qp, scale=qp.scale.cuda(), zero_point=qp.zero_point.cuda())


@cuda
@pytest.mark.parametrize("per_channel", [False, True], ids=["per_tensor", "per_channel"])
@pytest.mark.parametrize("dtype", ORACLE_DTYPES)
def test_cuda_paths_match_torch_cuda_kernels_on_ties(ao, dtype, per_channel):
    """On CUDA the default path rounds like PyTorch's CUDA kernels (a float64 division), and the
    decomposed path like the decomposed ops run there."""
    _, ao_utils = ao
    gen = torch.Generator().manual_seed(13)
    qscheme = torch.per_channel_affine if per_channel else torch.per_tensor_affine
    for cols in [1, 7, 31, 64, 65, 257]:
        rows = int(torch.randint(1, 5, (), generator=gen))
        qp = make_qparams(dtype, per_channel, rows, gen)
        w = weights_with_ties(qp, rows, cols, gen).cuda()
        qp = on_cuda(qp)
        codes, values = torch_oracle(w, qp)
        assert torch.equal(quantize(w, qp), codes), f"codes differ at cols={cols}"
        assert torch.equal(fake_quantize(w, qp), values), f"values differ at cols={cols}"
        args = (w, qscheme, getattr(torch, qp.dtype), qp.scale, qp.zero_point, 0, None, None)
        codes = ao_utils._quantize_weight_decomposed(*args)
        values = ao_utils._quantize_and_dequantize_weight_decomposed(*args)
        assert torch.equal(quantize(w, qp, decomposed=True), codes)
        assert torch.equal(fake_quantize(w, qp, decomposed=True), values)


def test_the_two_paths_really_differ_on_ties():
    # w * (1/s) = 2.5 exactly, zero point 1: rounding before adding z gives 3, after gives 4.
    qp = WeightQParams.create(qscheme="per_tensor_affine", dtype="quint8", scale=0.5, zero_point=1)
    w = torch.tensor([1.25])
    assert quantize(w, qp).item() == 4
    assert quantize(w, qp, decomposed=True).item() == 3


def test_per_channel_along_axis_1():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(5, 6, generator=gen)
    scale = w.abs().amax(0) / 127
    qp = WeightQParams.create(qscheme="per_channel_symmetric", dtype="qint8", scale=scale, axis=1)
    codes, values = torch_oracle(w, qp)
    assert torch.equal(quantize(w, qp), codes)
    assert torch.equal(fake_quantize(w, qp), values)


@pytest.mark.parametrize("dtype", ORACLE_DTYPES)
@pytest.mark.parametrize(
    ("shape", "per_channel", "axis"),
    [((37, 11), True, 0), ((37, 11), True, 1), ((37, 11), False, 0), ((9, 4, 5), True, 2)],
    ids=["rows", "columns", "per-tensor", "3-d"],
)
def test_block_by_block_equals_the_whole_weight_at_once(
    monkeypatch, dtype, shape, per_channel, axis
):
    """Blocks of a few rows, ragged last block included, give what one block gives."""
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(shape, generator=gen) * 0.1
    n = shape[axis] if per_channel else 1
    d = DTYPES[dtype]
    lo, hi = (d.qmin, d.qmax) if dtype != "qint32" else (-1000, 1000)
    qp = WeightQParams.create(
        qscheme="per_channel_affine" if per_channel else "per_tensor_affine",
        dtype=dtype,
        scale=(torch.rand(n, generator=gen) * 0.01 + 1e-3).reshape(-1 if per_channel else ()),
        zero_point=torch.randint(lo, hi + 1, (n,), generator=gen).reshape(
            -1 if per_channel else ()
        ),
        axis=axis,
    )
    whole = [quantize(w, qp), fake_quantize(w, qp), fake_quantize(w, qp, decomposed=True)]
    monkeypatch.setattr(quant, "BLOCK_ELEMENTS", 3 * w[0].numel())  # 3 rows a block
    assert len(list(quant._row_blocks(w))) == -(-shape[0] // 3)
    blocked = [quantize(w, qp), fake_quantize(w, qp), fake_quantize(w, qp, decomposed=True)]
    for a, b in zip(whole, blocked, strict=True):
        assert torch.equal(a, b)
    if per_channel and axis == 0:
        codes, values = torch_oracle(w, qp)
        assert torch.equal(blocked[0], codes) and torch.equal(blocked[1], values)


@pytest.mark.parametrize("decomposed", [False, True])
@pytest.mark.parametrize("qscheme", ["per_tensor_affine", "per_channel_affine"])
def test_weights_without_rows_give_empty_codes(qscheme, decomposed):
    qp = create(qscheme=qscheme, dtype="quint8", scale=torch.ones(1) * 0.1, axis=1)
    w = torch.empty(0, 1)
    assert quantize(w, qp, decomposed=decomposed).shape == (0, 1)
    assert fake_quantize(w, qp, decomposed=decomposed).shape == (0, 1)


@pytest.mark.parametrize("decomposed", [False, True])
@pytest.mark.parametrize("dtype", ["qint8", "quint8", "qint32"])
@pytest.mark.parametrize("qscheme", ["per_tensor_affine", "per_channel_affine"])
def test_nan_weights_get_code_0_and_its_value(qscheme, dtype, decomposed):
    """PyTorch leaves NaN's code undefined (its kernels give 0, 127 or -2**31); refq stores 0,
    and the fake-quantized value is that code's value, as a backend would compute."""
    per_channel = qscheme == "per_channel_affine"
    scale, zero_point = torch.tensor([0.1, 0.2, 0.3]), torch.tensor([1, 2, 3], dtype=torch.int32)
    qp = create(
        qscheme=qscheme,
        dtype=dtype,
        scale=scale if per_channel else scale[0],
        zero_point=zero_point if per_channel else zero_point[0],
    )
    w = torch.zeros(3, 4)
    w[2, 1] = float("nan")
    codes = quantize(w, qp, decomposed=decomposed)
    assert codes[2, 1] == 0
    values = fake_quantize(w, qp, decomposed=decomposed)
    assert torch.equal(values, dequantize(codes, qp, decomposed=decomposed))


def test_dequantized_values_keep_no_negative_zero():
    """Codes of 0 from weights just below zero dequantize to +0.0, as PyTorch's do."""
    qp = WeightQParams.create(qscheme="per_channel_symmetric", dtype="qint8", scale=[0.1], axis=0)
    values = fake_quantize(torch.tensor([[-0.01, 0.01, -0.0]]), qp)
    assert torch.equal(values, torch.zeros(1, 3))
    assert not torch.signbit(values).any()


# --- the fused multiply-add emulation ------------------------------------------------------


def f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def round_to_f32(x: Fraction) -> Fraction:
    """Exact round-to-nearest-even of a rational to float32 (subnormals too; no overflow)."""
    if x == 0:
        return Fraction(0)
    sign = -1 if x < 0 else 1
    x = abs(x)
    e = x.numerator.bit_length() - x.denominator.bit_length()
    if Fraction(2) ** e > x:
        e -= 1
    ulp = Fraction(2) ** (max(e, -126) - 23)  # below 2**-126 the step stays 2**-149
    n, rem = divmod(x, ulp)
    if rem * 2 > ulp or (rem * 2 == ulp and n % 2 == 1):
        n += 1
    return sign * n * ulp


@given(
    a=st.floats(-1024.0, 1024.0, width=32, allow_subnormal=False),
    b=st.floats(2.0**-13, 2.0**13, width=32, allow_subnormal=False),
    c=st.integers(-300, 300),
)
@example(a=1.2895628484152563e-37, b=0.0625, c=0)  # a subnormal result
def test_fma_is_correctly_rounded(a, b, c):
    exact = Fraction(a) * Fraction(b) + c
    got = _fma_f32(torch.tensor([a]), torch.tensor([b]), torch.tensor([c]))
    assert Fraction(got.item()) == round_to_f32(exact)


def double_rounding_case():
    """a, b, c with a*b+c one 2**-47 off a float32 midpoint: float64 alone rounds it wrongly.

    a = A * 2**-24, b = B * 2**-23, c = 64; A * B = K * 2**29 + 1 with K odd puts the exact sum
    2**-47 above the float32 midpoint 64 + K * 2**-18, and float64 rounds it onto the midpoint.
    """
    for big_a in range(2**23 + 1, 2**24, 2):
        big_b = pow(big_a, -1, 2**29)
        if 2**23 <= big_b < 2**24 and ((big_a * big_b - 1) >> 29) % 2 == 1:
            return big_a * 2.0**-24, big_b * 2.0**-23, 64
    raise AssertionError("no case found")


def test_fma_on_a_double_rounding_case():
    a, b, c = double_rounding_case()
    exact = Fraction(a) * Fraction(b) + c
    naive = torch.tensor([a], dtype=torch.float64) * b + c
    assert Fraction(naive.float().item()) != round_to_f32(exact)  # float64 alone goes wrong
    got = _fma_f32(torch.tensor([a]), torch.tensor([b]), torch.tensor([c]))
    assert Fraction(got.item()) == round_to_f32(exact)


# --- properties -------------------------------------------------------------------------------


@st.composite
def qparams_and_weight(draw):
    dtype = draw(st.sampled_from(ALL_DTYPES))
    d = DTYPES[dtype]
    per_channel = draw(st.booleans())
    rows = draw(st.integers(1, 4))
    cols = draw(st.integers(1, 9))
    lo = draw(st.integers(d.qmin, d.qmax - 1)) if dtype != "qint32" else draw(st.integers(-1000, 0))
    hi = draw(st.integers(lo + 1, d.qmax)) if dtype != "qint32" else draw(st.integers(1, 1000))
    n = rows if per_channel else 1
    scales = draw(st.lists(st.floats(2.0**-13, 10.0, width=32), min_size=n, max_size=n))
    zps = draw(st.lists(st.integers(lo, hi), min_size=n, max_size=n))
    qp = WeightQParams.create(
        qscheme="per_channel_affine" if per_channel else "per_tensor_affine",
        dtype=dtype,
        scale=scales if per_channel else scales[0],
        zero_point=zps if per_channel else zps[0],
        quant_min=lo,
        quant_max=hi,
    )
    values = draw(
        st.lists(st.floats(-1e4, 1e4, width=32), min_size=rows * cols, max_size=rows * cols)
    )
    return qp, torch.tensor(values).reshape(rows, cols), draw(st.booleans())


def broadcast(t, qp, ndim):
    return t.reshape(-1, *([1] * (ndim - 1))) if qp.per_channel else t


@given(qparams_and_weight())
def test_codes_stay_in_range(case):
    qp, w, decomposed = case
    q = quantize(w, qp, decomposed=decomposed)
    assert q.dtype == qp.storage
    assert int(q.min()) >= qp.quant_min and int(q.max()) <= qp.quant_max


@given(qparams_and_weight())
def test_error_within_half_a_step_of_the_clamped_weight(case):
    qp, w, decomposed = case
    s = broadcast(qp.scale.double(), qp, w.dim())
    z = broadcast(qp.zero_point.double(), qp, w.dim())
    lo, hi = (qp.quant_min - z) * s, (qp.quant_max - z) * s
    clamped = torch.minimum(torch.maximum(w.double(), lo), hi)
    err = (fake_quantize(w, qp, decomposed=decomposed).double() - clamped).abs()
    # half a step, plus float32 rounding of w / s and of (q - z) * s
    assert bool((err <= s * 0.5 + (clamped.abs() + s) * 2e-6).all())


@given(qparams_and_weight())
def test_requantizing_dequantized_codes_gives_them_back(case):
    qp, w, decomposed = case
    q = quantize(w, qp, decomposed=decomposed)
    assert torch.equal(
        quantize(dequantize(q, qp, decomposed=decomposed), qp, decomposed=decomposed), q
    )


# --- validation -------------------------------------------------------------------------------


def create(**overrides):
    fields = {"qscheme": "per_tensor_affine", "dtype": "quint8", "scale": 0.1, "zero_point": 3}
    fields.update(overrides)
    return WeightQParams.create(**fields, where="enc.weight_ih")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"scale": 0.0}, "scale must be positive and finite.*got 0.0"),
        ({"scale": -1.0}, "scale must be positive and finite.*got -1.0"),
        ({"scale": float("nan")}, "scale must be positive and finite.*got nan"),
        ({"scale": float("inf")}, "scale must be positive and finite.*got inf"),
        ({"scale": "big"}, "scale must be a number"),
        ({"zero_point": 256}, r"zero_point must lie in \[0, 255\], got 256"),
        ({"zero_point": -1}, r"zero_point must lie in \[0, 255\], got -1"),
        ({"zero_point": 1.5}, "zero_point must hold integers"),
        ({"zero_point": None}, "zero_point is required for per_tensor_affine"),
        ({"dtype": "qint16"}, "unknown dtype 'qint16' .did you mean 'qint8'.."),
        ({"qscheme": "per_tensor_afine"}, "did you mean 'per_tensor_affine'"),
        ({"quant_min": 10, "quant_max": 5}, "quant_min < quant_max"),
        ({"quant_max": 300}, r"quant_max <= 255"),
        ({"axis": 0.5}, "axis must be an integer"),
        ({"scale": [0.1, 0.2]}, "per_tensor_affine takes one scale, got 2"),
        (
            {"qscheme": "per_tensor_symmetric", "zero_point": 3},
            "symmetric schemes need zero_point 128",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else ",".join(f"{k}={v[k]}" for k in v),
)
def test_invalid_qparams_are_named_errors(overrides, message):
    with pytest.raises(QParamsError, match=message) as info:
        create(**overrides)
    assert str(info.value).startswith("enc.weight_ih: ")


def test_per_channel_scale_must_match_the_weight():
    qp = create(qscheme="per_channel_affine", scale=[0.1, 0.2, 0.3], zero_point=0, axis=0)
    with pytest.raises(QParamsError, match=r"3 entries but the weight has 4 channels along axis 0"):
        quantize(torch.zeros(4, 2), qp)
    qp = create(qscheme="per_channel_affine", scale=[0.1, 0.2], zero_point=0, axis=2)
    with pytest.raises(QParamsError, match="axis 2 is out of range for a 2-D weight"):
        quantize(torch.zeros(2, 2), qp)


def test_torch_objects_and_strings_are_the_same_qparams():
    a = create(
        qscheme=torch.per_channel_affine, dtype=torch.qint8, scale=[0.1, 0.2], zero_point=[0, 1]
    )
    b = create(
        qscheme="per_channel_affine", dtype="torch.qint8", scale=[0.1, 0.2], zero_point=[0, 1]
    )
    assert (a.qscheme, a.dtype, a.axis) == (b.qscheme, b.dtype, b.axis)
    assert torch.equal(a.scale, b.scale) and torch.equal(a.zero_point, b.zero_point)
    assert a.scale.dtype == torch.float32 and a.zero_point.dtype == torch.int32


@pytest.mark.parametrize(
    ("dtype", "zero_point", "storage"),
    [
        ("qint8", 0, torch.int8),
        ("quint8", 128, torch.uint8),
        ("int4", 0, torch.int8),
        ("uint4", 8, torch.uint8),
        ("qint32", 0, torch.int32),
    ],
)
def test_symmetric_schemes_put_the_zero_point_in_the_middle(dtype, zero_point, storage):
    qp = create(qscheme="per_tensor_symmetric", dtype=dtype, zero_point=None)
    assert qp.qscheme == "per_tensor_affine"
    assert int(qp.zero_point) == zero_point
    assert qp.storage == storage


def test_four_bit_codes_use_four_bit_ranges():
    w = torch.linspace(-2, 2, 41)
    qp = create(dtype="int4", scale=0.1, zero_point=0)
    q = quantize(w, qp)
    assert q.dtype == torch.int8 and int(q.min()) == -8 and int(q.max()) == 7


def test_quantized_weight_dequantizes_like_the_module_path():
    w = torch.randn(4, 3)
    qp = create(scale=0.01, zero_point=128)
    qw = QuantizedWeight(quantize(w, qp), qp)
    assert torch.equal(qw.dequantize(), fake_quantize(w, qp))
    assert qw.axis is None and qw.qparams.qscheme == "per_tensor_affine" and qw.dtype == "quint8"


def test_library_code_uses_no_quantized_tensor_api():
    """PyTorch 2.13 deprecates quantized dtypes and torch.quantize_per_*: refq never calls them."""
    banned = {
        "quantize_per_tensor",
        "quantize_per_channel",
        "qint8",
        "quint8",
        "qint32",
        "quint4x2",
        "_make_per_tensor_quantized_tensor",
    }
    package = Path(__file__).resolve().parents[1] / "refq_cli"
    found = []
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in banned:
                found.append(f"{path.name}:{node.lineno}: .{node.attr}")
    assert found == []


def test_quantizing_emits_no_deprecation_warning():
    w = torch.randn(8, 4)
    for qscheme, scale in [("per_tensor_affine", 0.01), ("per_channel_affine", [0.01] * 8)]:
        qp = create(qscheme=qscheme, scale=scale, zero_point=0, dtype="qint8")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            fake_quantize(w, qp)
            fake_quantize(w, qp, decomposed=True)


# --- edges: saturation, huge codes, parameter corner cases -----------------------------------


@pytest.mark.parametrize("per_channel", [False, True], ids=["per_tensor", "per_channel"])
@pytest.mark.parametrize("dtype", ORACLE_DTYPES)
def test_out_of_range_and_infinite_weights_saturate_like_torch(dtype, per_channel):
    w = torch.tensor([[float("inf"), 1e20, -1e20, float("-inf"), 3e9, -3e9]] * 2)
    scale = torch.tensor([1e-3, 2e-3])
    zp = torch.tensor([3, 5], dtype=torch.int32)
    qp = create(
        qscheme="per_channel_affine" if per_channel else "per_tensor_affine",
        dtype=dtype,
        scale=scale if per_channel else scale[0],
        zero_point=zp if per_channel else zp[0],
    )
    codes, _ = torch_oracle(w, qp)
    for decomposed in (False, True):
        ours = quantize(w, qp, decomposed=decomposed)
        assert torch.equal(ours, codes)


@pytest.mark.parametrize("per_channel", [False, True], ids=["per_tensor", "per_channel"])
def test_qint32_codes_beyond_float_precision_match_torch(per_channel):
    gen = torch.Generator().manual_seed(5)
    scale = torch.rand(3, generator=gen) * 0.05 + 1e-3
    zp = torch.randint(-(2**29), 2**29, (3,), generator=gen, dtype=torch.int32)
    qp = create(
        qscheme="per_channel_affine" if per_channel else "per_tensor_affine",
        dtype="qint32",
        scale=scale if per_channel else scale[0],
        zero_point=zp if per_channel else zp[0],
    )
    s = scale.reshape(-1, 1) if per_channel else scale[0]
    # codes up to +-2**30 around the zero point, so q - z stays inside int32
    w = (torch.rand(3, 200, generator=gen) * 2 - 1) * 2**30 * s
    codes, values = torch_oracle(w, qp)
    assert torch.equal(quantize(w, qp), codes)
    assert torch.equal(dequantize(codes, qp), values)


def test_scales_whose_reciprocal_overflows_are_rejected():
    with pytest.raises(QParamsError, match="and so must 1/scale"):
        create(scale=1e-39)


@pytest.mark.parametrize(
    ("dtype", "zero_point"),
    [("quint8", torch.tensor(2**32 + 5)), ("qint32", 2**31), ("qint32", torch.tensor(-(2**33)))],
)
def test_zero_points_beyond_int32_are_rejected_not_wrapped(dtype, zero_point):
    with pytest.raises(QParamsError, match="zero_point must lie in"):
        create(dtype=dtype, zero_point=zero_point)


def test_narrowed_unsigned_range_puts_the_symmetric_zero_point_where_torch_does():
    # torch.ao's observers: (quant_min + quant_max) // 2 for a customised unsigned range
    qp = create(qscheme="per_tensor_symmetric", zero_point=None, quant_min=0, quant_max=127)
    assert int(qp.zero_point) == 63


def test_the_wrong_symmetric_zero_point_is_the_one_named():
    with pytest.raises(QParamsError, match="got 5"):
        create(qscheme="per_channel_symmetric", dtype="qint8", scale=[0.1, 0.1], zero_point=[0, 5])


def test_lenient_inputs_torch_ao_accepts():
    assert create(axis=None).axis == 0  # axis is meaningless for per-tensor schemes
    qp = create(
        qscheme="per_channel_affine",
        scale=[0.1, 0.2],
        zero_point=[0, 0],
        axis=torch.tensor(1),
        quant_min=torch.tensor(0),
    )
    assert (qp.axis, qp.quant_min) == (1, 0)


def test_multi_dimensional_scales_are_rejected():
    with pytest.raises(QParamsError, match=r"got shape \(2, 2\)"):
        create(qscheme="per_channel_affine", scale=[[0.1, 0.2], [0.3, 0.4]], zero_point=0)
