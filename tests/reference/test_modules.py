"""refq's reference modules on their own: where torch.ao is wrong or silent, and the cache."""

from __future__ import annotations

import copy
import gc
import pickle
import warnings
import weakref

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from refq_cli import reference
from refq_cli.errors import QParamsError
from refq_cli.quant.numerics import (
    QuantizedWeight,
    WeightQParams,
    fake_quantize,
    quantize_with_values,
)
from refq_cli.reference import _weights
from tests.reference.helpers import REFERENCE_TYPE, tie_heavy_qparams, weight_names

ALL_FLOAT = {
    "RNNCell": lambda: nn.RNNCell(6, 8),
    "LSTMCell": lambda: nn.LSTMCell(6, 8),
    "GRUCell": lambda: nn.GRUCell(6, 8),
    "RNN": lambda: nn.RNN(6, 8, num_layers=2),
    "LSTM": lambda: nn.LSTM(6, 8, num_layers=2),
    "GRU": lambda: nn.GRU(6, 8, num_layers=2),
}
NAMES = {
    "RNNCell": "QuantizedRNNCell(Reference)",
    "LSTMCell": "QuantizedLSTMCell(Reference)",
    "GRUCell": "QuantizedGRUCell(Reference)",
    "RNN": "QuantizedRNN(Reference)",
    "LSTM": "QuantizedLSTM(Reference)",
    "GRU": "QuantizedGRU(Reference)",
}


def convert(float_mod, per_channel=True, dtype="qint8", **kwargs):
    qparams = tie_heavy_qparams(float_mod, per_channel, dtype, **kwargs)
    return REFERENCE_TYPE[type(float_mod)].from_float(float_mod, qparams), qparams


def float_with_fake_quantized_weights(float_mod, qparams):
    """The float module with each weight replaced by its fake-quantized value, computed here.

    Its weights stop requiring grad, as the reference modules' fake-quantized ones do: PyTorch's
    matmul picks another (differently rounded) kernel for a non-contiguous input when the
    weight requires grad.
    """
    expected = copy.deepcopy(float_mod).requires_grad_(False)
    decomposed = qparams["is_decomposed"]
    with torch.no_grad():
        for name in weight_names(expected):
            w = getattr(expected, name)
            qp = WeightQParams.create(**qparams[name])
            w.copy_(fake_quantize(w, qp, decomposed=decomposed))
    return expected


def run(mod, x, **kw):
    with torch.no_grad():
        return mod(x, **kw)


def flat(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if hasattr(out, "batch_sizes"):
        return [out.data]
    return [t for item in out for t in flat(item)]


def assert_equal(a, b):
    fa, fb = flat(a), flat(b)
    assert len(fa) == len(fb)
    for x, y in zip(fa, fb, strict=True):
        assert torch.equal(x, y)


# --- where PyTorch's reference modules are wrong or absent ----------------------------------


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq_first", "batch_first"])
def test_lstm_keeps_proj_size(bidirectional, batch_first):
    torch.manual_seed(0)
    float_mod = nn.LSTM(
        6, 12, num_layers=2, proj_size=5, bidirectional=bidirectional, batch_first=batch_first
    )
    ref, qparams = convert(float_mod)
    assert ref.proj_size == 5 and "weight_hr_l1" in qparams
    expected = float_with_fake_quantized_weights(float_mod, qparams)
    x = torch.randn(3, 9, 6) if batch_first else torch.randn(9, 3, 6)
    out, (h, c) = run(ref, x)
    assert out.shape[-1] == 5 * (2 if bidirectional else 1) and h.shape[-1] == 5
    assert_equal((out, (h, c)), run(expected, x))
    packed = pack_padded_sequence(
        x, torch.tensor([9, 2, 5]), batch_first=batch_first, enforce_sorted=False
    )
    assert_equal(run(ref, packed), run(expected, packed))
    unbatched = x[0] if batch_first else x[:, 0]
    assert_equal(run(ref, unbatched), run(expected, unbatched))


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("per_channel", [False, True], ids=["per_tensor", "per_channel"])
def test_rnn_matches_float_rnn_with_fake_quantized_weights(nonlinearity, per_channel):
    torch.manual_seed(1)
    float_mod = nn.RNN(5, 7, num_layers=2, nonlinearity=nonlinearity, bidirectional=True)
    ref, qparams = convert(float_mod, per_channel=per_channel, dtype="quint8")
    assert ref.nonlinearity == nonlinearity and ref._get_name() == "QuantizedRNN(Reference)"
    expected = float_with_fake_quantized_weights(float_mod, qparams)
    x = torch.randn(6, 3, 5)
    hx = torch.randn(4, 3, 7)
    assert_equal(run(ref, x), run(expected, x))
    assert_equal(run(ref, x, hx=hx), run(expected, x, hx=hx))
    assert_equal(run(ref, x[:, 0]), run(expected, x[:, 0]))
    packed = pack_padded_sequence(x, torch.tensor([6, 1, 4]), enforce_sorted=False)
    assert_equal(run(ref, packed), run(expected, packed))


@pytest.mark.parametrize("kind", list(ALL_FLOAT))
def test_is_decomposed_is_honoured(kind):
    torch.manual_seed(2)
    float_mod = ALL_FLOAT[kind]()
    ref, qparams = convert(float_mod, per_channel=False, dtype="quint8", is_decomposed=True)
    assert ref.is_decomposed
    expected = float_with_fake_quantized_weights(float_mod, qparams)
    x = torch.randn(4, 3, 6) if kind in ("RNN", "LSTM", "GRU") else torch.randn(3, 6)
    assert_equal(run(ref, x), run(expected, x))
    default = REFERENCE_TYPE[type(float_mod)].from_float(
        float_mod, {**qparams, "is_decomposed": False}
    )
    # tie-heavy weights with nonzero zero points round differently on the two paths
    differs = [
        not torch.equal(ref.get_weight(n), default.get_weight(n))
        for n in qparams
        if n != "is_decomposed"
    ]
    assert any(differs)


@pytest.mark.parametrize("kind", list(ALL_FLOAT))
def test_quant_min_and_quant_max_are_honoured(kind):
    float_mod = ALL_FLOAT[kind]()
    qparams = {"is_decomposed": False}
    for name in weight_names(float_mod):
        qparams[name] = {
            "qscheme": "per_tensor_affine",
            "dtype": "qint8",
            "scale": 0.01,
            "zero_point": 0,
            "quant_min": -8,
            "quant_max": 7,
        }
    ref = REFERENCE_TYPE[type(float_mod)].from_float(float_mod, qparams)
    for name in weight_names(float_mod):
        codes = ref.get_quantized_weight(name).int_repr()
        assert int(codes.min()) == -8 and int(codes.max()) == 7
        assert float(ref.get_weight(name).abs().max()) <= 0.08 + 1e-7


# --- the seed-compatible surface ------------------------------------------------------------


@pytest.mark.parametrize("kind", list(ALL_FLOAT))
def test_names_getters_and_state_dict_round_trip(kind):
    torch.manual_seed(3)
    float_mod = ALL_FLOAT[kind]()
    ref, qparams = convert(float_mod)
    assert ref._get_name() == NAMES[kind]
    for name in weight_names(float_mod):
        qw = ref.get_quantized_weight(name)
        assert isinstance(qw, QuantizedWeight) and qw.int_repr().dtype == torch.int8
        assert torch.equal(qw.dequantize(), ref.get_weight(name))
        assert f"{name}_scale" in ref.state_dict() and f"{name}_axis" in ref.state_dict()

    other = REFERENCE_TYPE[type(float_mod)].from_float(ALL_FLOAT[kind](), qparams)
    other.load_state_dict(ref.state_dict())
    x = torch.randn(4, 2, 6) if kind in ("RNN", "LSTM", "GRU") else torch.randn(2, 6)
    assert_equal(run(other, x), run(ref, x))


def test_constructor_defaults_to_pytorchs_default_qparams():
    ref = reference.LSTM(4, 6)
    qp = ref.weight_qparams("weight_ih_l0")
    assert (qp.qscheme, qp.dtype, float(qp.scale), int(qp.zero_point)) == (
        "per_tensor_affine",
        "quint8",
        1.0,
        0,
    )


def test_torch_objects_and_strings_give_the_same_module():
    float_mod = nn.GRUCell(6, 8)
    as_objects = tie_heavy_qparams(float_mod, True, "qint8")
    as_strings = {
        k: v if k == "is_decomposed" else {**v, "qscheme": "per_channel_affine", "dtype": "qint8"}
        for k, v in as_objects.items()
    }
    x = torch.randn(3, 6)
    a = reference.GRUCell.from_float(float_mod, as_objects)
    b = reference.GRUCell.from_float(float_mod, as_strings)
    assert_equal(run(a, x), run(b, x))


def test_qscheme_none_keeps_a_weight_float():
    float_mod = nn.LSTMCell(6, 8)
    qparams = tie_heavy_qparams(float_mod, True, "qint8")
    qparams["weight_hh"] = {"qscheme": None, "dtype": torch.float}
    ref = reference.LSTMCell.from_float(float_mod, qparams)
    assert ref.get_weight_hh() is float_mod.weight_hh
    assert ref.get_quantized_weight_hh() is float_mod.weight_hh
    assert isinstance(ref.get_quantized_weight_ih(), QuantizedWeight)


def test_get_flat_weights_and_bias_dict():
    float_mod = nn.LSTM(6, 8, num_layers=2)
    ref, qparams = convert(float_mod)
    flat_weights = ref.get_flat_weights()
    assert len(flat_weights) == len(float_mod._flat_weights_names)
    for name, tensor in zip(float_mod._flat_weights_names, flat_weights, strict=True):
        if name.startswith("bias"):
            assert tensor is getattr(float_mod, name)
        else:
            qp = WeightQParams.create(**qparams[name])
            assert torch.equal(tensor, fake_quantize(getattr(float_mod, name), qp))
    bias_dict = ref.get_quantized_weight_bias_dict()
    assert isinstance(bias_dict["weight_hh_l1"], QuantizedWeight)
    assert bias_dict["bias_hh_l1"] is float_mod.bias_hh_l1


# --- errors -----------------------------------------------------------------------------------


def entry():
    return {"qscheme": "per_tensor_affine", "dtype": "qint8", "scale": 0.1, "zero_point": 0}


@pytest.mark.parametrize(
    ("qparams", "message"),
    [
        ({"weight_ih": entry()}, "missing weight_hh"),
        (
            {"weight_ih": entry(), "weight_hh": entry(), "weight_hr": entry()},
            "unknown weight 'weight_hr'",
        ),
        ({"weight_ih": entry(), "weight_hhh": entry()}, "did you mean 'weight_hh'"),
        ({"weight_ih": entry(), "weight_hh": {**entry(), "scael": 1}}, "did you mean 'scale'"),
        ({"weight_ih": entry(), "weight_hh": {"dtype": "qint8"}}, "missing qscheme, scale"),
        ({"weight_ih": entry(), "weight_hh": 0.1}, "expected a dict"),
        (
            {"weight_ih": entry(), "weight_hh": entry(), "is_decomposed": "no"},
            "is_decomposed must be true or false",
        ),
        (
            {
                "weight_ih": entry(),
                "weight_hh": {**entry(), "qscheme": "per_channel_affine", "scale": [0.1, 0.2]},
            },
            "per-channel scale has 2 entries but the weight has 32 channels",
        ),
    ],
    ids=[
        "missing",
        "extra",
        "misnamed",
        "bad-field",
        "incomplete",
        "not-a-dict",
        "decomposed",
        "wrong-length",
    ],
)
def test_bad_weight_qparams_dicts_are_clear_errors(qparams, message):
    with pytest.raises(QParamsError, match=message):
        reference.LSTMCell.from_float(nn.LSTMCell(6, 8), qparams)


def test_from_float_checks_the_module_type():
    with pytest.raises(QParamsError, match=r"expects torch\.nn\.LSTM, got GRU"):
        reference.LSTM.from_float(nn.GRU(4, 4), None)


# --- the cache --------------------------------------------------------------------------------


@pytest.fixture
def count_fake_quantize(monkeypatch):
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return quantize_with_values(*args, **kwargs)

    monkeypatch.setattr(_weights, "quantize_with_values", counting)
    return calls


def fresh_output(ref, x):
    """Output of a module rebuilt from scratch out of ``ref``'s current state."""
    rebuilt = copy.deepcopy(ref)
    rebuilt.invalidate_cache()
    return run(rebuilt, x)


def test_weights_are_quantized_once_across_calls(count_fake_quantize):
    ref, _ = convert(nn.LSTM(6, 8, num_layers=2))
    assert len(count_fake_quantize) == 4  # by from_float, which leaves the codes ready
    x = torch.randn(3, 2, 6)
    first = run(ref, x)
    assert len(count_fake_quantize) == 4
    assert_equal(run(ref, x), first)
    run(ref, x[:, 0])
    assert len(count_fake_quantize) == 4


@pytest.mark.parametrize(
    "change",
    [
        lambda m: m.weight_hh_l0.mul_(0.5),
        lambda m: m.weight_hh_l0_scale.mul_(2),
        lambda m: m.weight_hh_l0_zero_point.add_(1),
        lambda m: setattr(m, "weight_ih_l0", nn.Parameter(torch.randn_like(m.weight_ih_l0))),
        lambda m: m.bias_ih_l0.add_(1),
        lambda m: m.load_state_dict(
            {k: v * 0.9 if k == "weight_ih_l0" else v for k, v in m.state_dict().items()}
        ),
    ],
    ids=[
        "weight-in-place",
        "scale-in-place",
        "zero-point-in-place",
        "weight-replaced",
        "bias-in-place",
        "load-state-dict",
    ],
)
def test_cache_follows_every_change(change):
    ref, _ = convert(nn.LSTM(6, 8), per_channel=False, dtype="quint8")
    x = torch.randn(3, 2, 6)
    before = run(ref, x)
    with torch.no_grad():
        change(ref)
    after = run(ref, x)
    assert not torch.equal(flat(after)[0], flat(before)[0])
    assert_equal(after, fresh_output(ref, x))


def test_axis_buffer_edited_in_place_takes_effect():
    float_mod = nn.RNNCell(8, 8)
    qparams = {
        name: {
            "qscheme": "per_channel_symmetric",
            "dtype": "qint8",
            "axis": 0,
            "scale": torch.linspace(0.001, 0.01, 8),
        }
        for name in ("weight_ih", "weight_hh")
    }
    ref = reference.RNNCell.from_float(float_mod, qparams)
    along_rows = ref.get_weight_hh()
    with torch.no_grad():
        ref.weight_hh_axis.fill_(1)
    qp = WeightQParams.create(**{**qparams["weight_hh"], "axis": 1})
    assert torch.equal(ref.get_weight_hh(), fake_quantize(float_mod.weight_hh, qp))
    assert not torch.equal(ref.get_weight_hh(), along_rows)


def served(ref, name):
    """A weak reference to the fake-quantized weight the module computes with now."""
    return weakref.ref(ref.get_weight(name))


def test_moving_the_module_refreshes_the_cache():
    ref, _ = convert(nn.GRUCell(6, 8))
    x = torch.randn(2, 6)
    run(ref, x)
    cached = served(ref, "weight_hh")
    assert cached() is not None and served(ref, "weight_hh")() is cached()  # one cached copy
    ref.double()
    gc.collect()
    assert cached() is None  # the float32 copies are dropped at once, not at the next forward
    out = run(ref, x.double())
    assert out.dtype == torch.float64
    assert_equal(out, fresh_output(ref, x.double()))


@pytest.mark.parametrize(
    "change",
    [
        lambda m: setattr(m, "weight_hh_quant_min", 50),
        lambda m: setattr(m, "weight_hh_quant_max", 200),
        lambda m: setattr(m, "is_decomposed", not m.is_decomposed),
    ],
    ids=["quant_min", "quant_max", "is_decomposed"],
)
def test_cache_follows_quantization_attributes(change):
    ref, _ = convert(nn.GRUCell(6, 8), per_channel=False, dtype="quint8")
    before = ref.get_weight_hh()
    change(ref)
    after = ref.get_weight_hh()
    assert not torch.equal(after, before)
    assert torch.equal(after, fresh_output_weight(ref, "weight_hh"))


def fresh_output_weight(ref, name):
    rebuilt = copy.deepcopy(ref)
    rebuilt.invalidate_cache()
    return rebuilt.get_weight(name)


def test_parametrized_weights_are_never_served_stale():
    from torch.nn.utils import parametrize

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.factor = nn.Parameter(torch.tensor(1.0))

        def forward(self, w):
            return w * self.factor

    ref, _ = convert(nn.GRUCell(6, 8), per_channel=False, dtype="qint8")
    parametrize.register_parametrization(ref, "weight_hh", Scaled())
    x, h = torch.randn(2, 6), torch.randn(2, 8)  # weight_hh acts on h: zeros would hide it
    before = run(ref, x, hx=h)
    with torch.no_grad():
        ref.parametrizations.weight_hh[0].factor.fill_(0.5)
    assert not torch.equal(run(ref, x, hx=h), before)


@pytest.mark.parametrize("kind", ["LSTM", "GRUCell"])
def test_torch_export_traces_the_reference_modules(kind):
    ref, _ = convert(ALL_FLOAT[kind]())
    ref.eval()
    x = torch.randn(5, 2, 6) if kind == "LSTM" else torch.randn(2, 6)
    exported = torch.export.export(ref, (x,)).module()
    # Exported recurrent kernels are decomposed into other ops: equal up to float rounding.
    torch.testing.assert_close(flat(exported(x)), flat(run(ref, x)), rtol=0, atol=1e-6)


def test_writes_through_data_need_invalidate_cache():
    ref, _ = convert(nn.GRUCell(6, 8))
    x = torch.randn(2, 6)
    before = run(ref, x)
    ref.weight_ih.data.mul_(0.5)  # bypasses the version counter
    assert torch.equal(run(ref, x), before)
    ref.invalidate_cache()
    assert not torch.equal(run(ref, x), before)


def test_inference_mode_cache_is_not_reused_for_autograd():
    ref, _ = convert(nn.LSTMCell(6, 8))
    x = torch.randn(2, 6, requires_grad=True)
    with torch.inference_mode():
        ref(x.detach())
    h, _ = ref(x)
    h.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_pickled_module_carries_no_cache_and_runs_the_same():
    ref, _ = convert(nn.GRU(6, 8, num_layers=2))
    x = torch.randn(3, 2, 6)
    size_before_forward = len(pickle.dumps(ref))
    out = run(ref, x)
    assert len(pickle.dumps(ref)) == size_before_forward
    restored = pickle.loads(pickle.dumps(ref))
    assert_equal(run(restored, x), out)


# --- CUDA -------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("kind", list(ALL_FLOAT))
def test_cuda_matches_float_module_with_fake_quantized_weights(kind):
    torch.manual_seed(5)
    float_mod = ALL_FLOAT[kind]().cuda()
    ref, qparams = convert(float_mod)
    expected = float_with_fake_quantized_weights(float_mod, qparams)
    x = (torch.randn(4, 3, 6) if kind in ("RNN", "LSTM", "GRU") else torch.randn(3, 6)).cuda()
    assert_equal(run(ref, x), run(expected, x))


@cuda
@pytest.mark.parametrize("per_channel", [False, True], ids=["per_tensor", "per_channel"])
def test_cuda_matches_torch_ao_on_cuda(ao, per_channel):
    ao_reference, _ = ao
    torch.manual_seed(6)
    float_mod = nn.LSTM(6, 8, num_layers=2, bidirectional=True).cuda()
    qparams = tie_heavy_qparams(float_mod, per_channel, "quint8")
    ours = reference.LSTM.from_float(float_mod, qparams)
    theirs = ao_reference.LSTM.from_float(float_mod, qparams)
    x = torch.randn(5, 3, 6, device="cuda")
    assert_equal(run(ours, x), run(theirs, x))


@cuda
@pytest.mark.parametrize("kind", ["RNN", "LSTM", "GRU"])
def test_cuda_weights_reach_cudnn_in_its_flat_layout(kind):
    torch.manual_seed(7)
    float_mod = ALL_FLOAT[kind]().cuda()
    ref, _ = convert(float_mod)
    x = torch.randn(4, 3, 6, device="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "weights are not part of single contiguous chunk"
        run(ref, x)
    storages = {w.untyped_storage().data_ptr() for w in ref.get_flat_weights()}
    assert len(storages) == 1
    assert all(p.untyped_storage().data_ptr() not in storages for p in ref.parameters())


def test_known_fake_quantized_weights_are_taken_without_recomputing(count_fake_quantize):
    float_mod = nn.GRU(6, 8)
    qparams = tie_heavy_qparams(float_mod, True, "qint8")
    expected = REFERENCE_TYPE[nn.GRU].from_float(float_mod, qparams)
    x = torch.randn(4, 2, 6)
    want = run(expected, x)
    calls = len(count_fake_quantize)
    with _weights.deferred_cache():
        ref = REFERENCE_TYPE[nn.GRU].from_float(float_mod, qparams)
    ref.use_quantized({n: (None, expected.get_weight(n)) for n in weight_names(float_mod)})
    assert_equal(run(ref, x), want)
    assert len(count_fake_quantize) == calls  # nothing quantized again
    with torch.no_grad():
        ref.weight_hh_l0.mul_(0.5)  # a later change still refreshes the cache
    assert not torch.equal(flat(run(ref, x))[0], flat(want)[0])
