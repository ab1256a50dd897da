"""QuantizedWeight reads like a torch quantized tensor: PyTorch's accessors, names and types.

Where PyTorch can represent a weight (8-bit and qint32 codes over their full range, a
non-negative axis), refq's answers are checked bit for bit against ``torch.quantize_per_tensor``
and ``torch.quantize_per_channel`` applied to the same float weight and parameters.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from refq_cli import reference
from refq_cli.errors import QParamsError, SpecError
from refq_cli.quant.numerics import QuantizedWeight, WeightQParams, quantize
from refq_cli.quant.observers import observe
from refq_cli.spec.spec import parse_spec, resolve
from tests.reference.helpers import REFERENCE_TYPE, tie_heavy_qparams, weight_names

FLOAT_MODULES = {
    "RNNCell": lambda: nn.RNNCell(6, 8),
    "LSTMCell": lambda: nn.LSTMCell(6, 8),
    "GRUCell": lambda: nn.GRUCell(6, 8),
    "RNN": lambda: nn.RNN(6, 8, num_layers=2),
    "LSTM": lambda: nn.LSTM(6, 8, num_layers=2, proj_size=4),
    "GRU": lambda: nn.GRU(6, 8, num_layers=2, bidirectional=True),
}
PER_TENSOR_ACCESSORS = ("q_scale", "q_zero_point")
PER_CHANNEL_ACCESSORS = ("q_per_channel_scales", "q_per_channel_zero_points", "q_per_channel_axis")


def qint32_qparams(mod: nn.Module, per_channel: bool, axis: int = 0) -> dict:
    """Affine qint32 parameters with non-trivial zero points for every weight of ``mod``."""
    qparams: dict = {}
    for name in weight_names(mod):
        w = getattr(mod, name).detach()
        reduce = tuple(d for d in range(w.dim()) if d != axis % w.dim())
        if per_channel:
            scale = w.abs().amax(dim=reduce) / 1000 + 1e-4
            zero_point = torch.arange(scale.numel(), dtype=torch.int32) * 7 - 20
            entry = {"scale": scale, "zero_point": zero_point, "axis": axis}
        else:
            entry = {"scale": float(w.abs().amax() / 1000), "zero_point": 13}
        qscheme = "per_channel_affine" if per_channel else "per_tensor_affine"
        qparams[name] = {"qscheme": qscheme, "dtype": "qint32", **entry}
    return qparams


def module_qparams(mod: nn.Module, per_channel: bool, dtype: str) -> dict:
    if dtype == "qint32":
        return qint32_qparams(mod, per_channel)
    return tie_heavy_qparams(mod, per_channel, dtype)  # weights moved onto rounding ties


def torch_quantized(w: torch.Tensor, entry: dict) -> torch.Tensor:
    """PyTorch's quantized tensor for ``w`` and one weight_qparams entry, or skip."""
    name = str(entry["dtype"]).removeprefix("torch.")
    if not hasattr(torch, "quantize_per_channel") or not hasattr(torch, name):
        pytest.skip("this torch has no quantized tensors to compare with")
    dtype = getattr(torch, name)
    per_channel = "per_channel" in str(entry["qscheme"])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PyTorch 2.13 deprecates quantized tensors
            if per_channel:
                axis = entry.get("axis", 0) % w.dim()
                scale = torch.as_tensor(entry["scale"], dtype=torch.float32)
                zero_point = torch.as_tensor(entry["zero_point"], dtype=torch.int64)
                return torch.quantize_per_channel(w.detach(), scale, zero_point, axis, dtype)
            return torch.quantize_per_tensor(
                w.detach(), float(entry["scale"]), int(entry["zero_point"]), dtype
            )
    except (RuntimeError, NotImplementedError) as exc:
        pytest.skip(f"torch's quantized ops are unavailable: {exc}")


def assert_reads_like(ours: QuantizedWeight, theirs: torch.Tensor) -> None:
    """Every accessor of ``ours`` gives what ``theirs`` gives, values, dtypes and types alike."""
    assert torch.equal(ours.int_repr(), theirs.int_repr())
    assert ours.int_repr().dtype == theirs.int_repr().dtype
    assert ours.qscheme() == theirs.qscheme()
    assert isinstance(ours.qscheme(), torch.qscheme)
    if theirs.qscheme() == torch.per_tensor_affine:
        assert type(ours.q_scale()) is float and type(ours.q_zero_point()) is int
        assert ours.q_scale() == theirs.q_scale()
        assert ours.q_zero_point() == theirs.q_zero_point()
        wrong = PER_CHANNEL_ACCESSORS
    else:
        assert torch.equal(ours.q_per_channel_scales(), theirs.q_per_channel_scales())
        assert ours.q_per_channel_scales().dtype == theirs.q_per_channel_scales().dtype
        assert torch.equal(ours.q_per_channel_zero_points(), theirs.q_per_channel_zero_points())
        assert ours.q_per_channel_zero_points().dtype == theirs.q_per_channel_zero_points().dtype
        assert type(ours.q_per_channel_axis()) is int
        assert ours.q_per_channel_axis() == theirs.q_per_channel_axis()
        wrong = PER_TENSOR_ACCESSORS
    for accessor in wrong:  # the other scheme's accessors raise, in both
        with pytest.raises(RuntimeError):
            getattr(theirs, accessor)()
        with pytest.raises(RuntimeError, match=rf"{accessor}\(\) needs a per-"):
            getattr(ours, accessor)()
    assert torch.equal(ours.dequantize(), theirs.dequantize())


# --- parity with torch's quantized tensors ---------------------------------------------------


@pytest.mark.parametrize("per_channel", [False, True], ids=["per_tensor", "per_channel"])
@pytest.mark.parametrize("dtype", ["qint8", "quint8", "qint32"])
@pytest.mark.parametrize("kind", list(FLOAT_MODULES))
def test_quantized_weights_read_like_torch_quantized_tensors(kind, dtype, per_channel):
    torch.manual_seed(0)
    float_mod = FLOAT_MODULES[kind]()
    qparams = module_qparams(float_mod, per_channel, dtype)
    ref = REFERENCE_TYPE[type(float_mod)].from_float(float_mod, qparams)
    for name in weight_names(float_mod):
        ours = ref.get_quantized_weight(name)
        assert isinstance(ours, QuantizedWeight)
        assert_reads_like(ours, torch_quantized(getattr(float_mod, name), qparams[name]))


@pytest.mark.parametrize("kind", ["RNNCell", "LSTMCell", "GRUCell"])
def test_cell_getters_give_the_same_weights(kind):
    torch.manual_seed(1)
    float_mod = FLOAT_MODULES[kind]()
    qparams = tie_heavy_qparams(float_mod, True, "qint8")
    ref = REFERENCE_TYPE[type(float_mod)].from_float(float_mod, qparams)
    for name, getter in [
        ("weight_ih", ref.get_quantized_weight_ih),
        ("weight_hh", ref.get_quantized_weight_hh),
    ]:
        assert_reads_like(getter(), torch_quantized(getattr(float_mod, name), qparams[name]))


def test_sequence_weight_by_name_and_bias_dict():
    torch.manual_seed(2)
    float_mod = nn.LSTM(6, 8, num_layers=2)
    qparams = tie_heavy_qparams(float_mod, False, "quint8")
    ref = reference.LSTM.from_float(float_mod, qparams)
    ours = ref.get_quantized_weight("weight_ih_l0")
    assert_reads_like(ours, torch_quantized(float_mod.weight_ih_l0, qparams["weight_ih_l0"]))
    from_dict = ref.get_quantized_weight_bias_dict()["weight_hh_l1"]
    assert_reads_like(from_dict, torch_quantized(float_mod.weight_hh_l1, qparams["weight_hh_l1"]))


@pytest.mark.parametrize("dtype", ["qint8", "quint8", "qint32"])
def test_negative_axis_reads_as_torchs_non_negative_axis(dtype):
    torch.manual_seed(3)
    float_mod = nn.GRUCell(6, 8)
    qparams = qint32_qparams(float_mod, True, axis=-1)
    for entry in qparams.values():
        entry["dtype"] = dtype
        entry["zero_point"] = entry["zero_point"].clamp(0, 127)
    ref = reference.GRUCell.from_float(float_mod, qparams)
    ours = ref.get_quantized_weight_ih()
    assert ours.axis == -1 and ours.q_per_channel_axis() == 1  # PyTorch refuses axis=-1
    assert_reads_like(ours, torch_quantized(float_mod.weight_ih, qparams["weight_ih"]))


@pytest.mark.parametrize("symmetric", [False, True], ids=["affine", "symmetric"])
def test_symmetric_schemes_read_as_affine_like_torch(symmetric):
    w = torch.randn(4, 5)
    kind = "symmetric" if symmetric else "affine"
    per_tensor = WeightQParams.create(
        qscheme=f"per_tensor_{kind}", dtype="quint8", scale=0.02, zero_point=128
    )
    per_channel = WeightQParams.create(
        qscheme=f"per_channel_{kind}", dtype="qint8", scale=[0.01, 0.02, 0.03, 0.04], zero_point=0
    )
    assert QuantizedWeight(quantize(w, per_tensor), per_tensor).qscheme() == torch.per_tensor_affine
    assert (
        QuantizedWeight(quantize(w, per_channel), per_channel).qscheme() == torch.per_channel_affine
    )


# --- refq's own guarantees -------------------------------------------------------------------


@pytest.mark.parametrize("decomposed", [False, True], ids=["default", "decomposed"])
def test_accessors_types_without_torch(decomposed):
    w = torch.randn(3, 4)
    qp = WeightQParams.create(
        qscheme="per_channel_affine", dtype="quint8", scale=[0.01, 0.02, 0.03], zero_point=[1, 2, 3]
    )
    qw = QuantizedWeight(quantize(w, qp, decomposed=decomposed), qp, decomposed)
    assert qw.q_per_channel_scales().dtype == torch.float64
    assert qw.q_per_channel_zero_points().tolist() == [1, 2, 3]
    assert qw.q_per_channel_zero_points().dtype == torch.int64
    assert qw.q_per_channel_axis() == 0 and qw.axis == 0
    with pytest.raises(RuntimeError, match=r"use q_per_channel_scales\(\)"):
        qw.q_scale()
    with pytest.raises(RuntimeError, match=r"per_channel_affine"):
        qw.q_zero_point()

    qp = WeightQParams.create(qscheme="per_tensor_affine", dtype="qint8", scale=0.5, zero_point=-3)
    qw = QuantizedWeight(quantize(w, qp, decomposed=decomposed), qp, decomposed)
    assert (qw.q_scale(), qw.q_zero_point()) == (0.5, -3)
    assert qw.qscheme() == torch.per_tensor_affine and qw.axis is None
    for accessor in PER_CHANNEL_ACCESSORS:
        with pytest.raises(RuntimeError, match=r"use q_scale\(\) and q_zero_point\(\)"):
            getattr(qw, accessor)()


def test_int_repr_is_a_copy_like_torchs():
    w = torch.randn(3, 4)
    qp = WeightQParams.create(qscheme="per_tensor_affine", dtype="qint8", scale=0.1, zero_point=0)
    qw = QuantizedWeight(quantize(w, qp), qp)
    before = qw.dequantize()
    codes = qw.int_repr()
    codes.fill_(7)
    assert torch.equal(qw.dequantize(), before)
    assert torch.equal(qw.int_repr(), qw.codes) and qw.int_repr().data_ptr() != qw.codes.data_ptr()


def test_accessors_emit_no_deprecation_warning():
    w = torch.randn(3, 4)
    for qscheme, scale in [("per_tensor_affine", 0.1), ("per_channel_affine", [0.1] * 3)]:
        qp = WeightQParams.create(qscheme=qscheme, dtype="qint8", scale=scale, zero_point=0)
        qw = QuantizedWeight(quantize(w, qp), qp)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            qw.int_repr(), qw.qscheme(), qw.dequantize()
            if qp.per_channel:
                qw.q_per_channel_scales(), qw.q_per_channel_zero_points(), qw.q_per_channel_axis()
            else:
                qw.q_scale(), qw.q_zero_point()


# --- a single scale under a per-channel scheme -----------------------------------------------

PER_TENSOR_HINT = "use qscheme per_tensor_affine or per_tensor_symmetric"


@pytest.mark.parametrize("qscheme", ["per_channel_symmetric", "per_channel_affine"])
def test_fixed_scalar_scale_under_per_channel_suggests_per_tensor(qscheme):
    spec = parse_spec(
        "version: 1\n"
        f"defaults: {{observer: fixed, qscheme: {qscheme}, scale: 0.1, zero_point: 0}}\n",
        "q.yaml",
    )
    plan = resolve(spec, {"enc": ["weight_ih"]})["enc"]
    with pytest.raises(SpecError) as info:
        observe(torch.randn(4, 3), plan.weights["weight_ih"], "enc.weight_ih")
    message = str(info.value)
    assert message.startswith("q.yaml:2:")  # at the spec setting
    assert "per-channel scale has 1 entries but the weight has 4 channels" in message
    assert message.endswith(f"for one scale for the whole weight {PER_TENSOR_HINT}")


def test_scalar_scale_hint_directly_and_only_for_one_scale():
    qp = WeightQParams.create(qscheme="per_channel_affine", dtype="qint8", scale=0.1, zero_point=0)
    with pytest.raises(QParamsError, match=PER_TENSOR_HINT):
        qp.check_weight(torch.randn(4, 3), "w")
    qp.check_weight(torch.randn(1, 3), "w")  # one channel: one scale is right
    two = WeightQParams.create(
        qscheme="per_channel_affine", dtype="qint8", scale=[0.1, 0.2], zero_point=0
    )
    with pytest.raises(QParamsError) as info:
        two.check_weight(torch.randn(4, 3), "w")
    assert "per_tensor" not in str(info.value)
