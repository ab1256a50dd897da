"""refq's reference modules against torch.ao's, bit for bit, where torch.ao is correct."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from tests.reference.helpers import FLOAT_CELLS, REFERENCE_TYPE, tie_heavy_qparams

SCHEMES = pytest.mark.parametrize("per_channel", [False, True], ids=["per_tensor", "per_channel"])
DTYPES = pytest.mark.parametrize("dtype", ["quint8", "qint8"])


def both(ao, float_mod, qparams):
    ao_reference, _ = ao
    ours = REFERENCE_TYPE[type(float_mod)].from_float(float_mod, qparams)
    theirs = getattr(ao_reference, type(float_mod).__name__).from_float(float_mod, qparams)
    return ours, theirs


def assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif hasattr(a, "data") and hasattr(a, "batch_sizes"):  # PackedSequence
        assert torch.equal(a.data, b.data)
        assert torch.equal(a.batch_sizes, b.batch_sizes)
        assert torch.equal(a.sorted_indices, b.sorted_indices)
        assert torch.equal(a.unsorted_indices, b.unsorted_indices)
    else:
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@DTYPES
@SCHEMES
@pytest.mark.parametrize("kind", list(FLOAT_CELLS))
def test_cells_match_torch_ao(ao, kind, per_channel, dtype, bias):
    torch.manual_seed(0)
    float_mod = FLOAT_CELLS[kind](12, 20, bias)
    ours, theirs = both(ao, float_mod, tie_heavy_qparams(float_mod, per_channel, dtype))
    assert ours._get_name() == theirs._get_name()
    assert torch.equal(ours.get_weight_ih(), theirs.get_weight_ih())
    assert torch.equal(ours.get_weight_hh(), theirs.get_weight_hh())
    assert torch.equal(
        ours.get_quantized_weight_hh().int_repr(), theirs.get_quantized_weight_hh().int_repr()
    )

    x = torch.randn(5, 12)
    is_lstm = kind == "LSTMCell"
    hx = (torch.randn(5, 20), torch.randn(5, 20)) if is_lstm else torch.randn(5, 20)
    unbatched_hx = (hx[0][0], hx[1][0]) if is_lstm else hx[0]
    with torch.no_grad():
        assert_same(ours(x), theirs(x))
        assert_same(ours(x, hx), theirs(x, hx))
        assert_same(ours(x[0]), theirs(x[0]))
        assert_same(ours(x[0], unbatched_hx), theirs(x[0], unbatched_hx))


@pytest.mark.parametrize("batch_first", [False, True], ids=["seq_first", "batch_first"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("num_layers", [1, 2], ids=["1layer", "2layers"])
@DTYPES
@SCHEMES
@pytest.mark.parametrize("float_type", [nn.LSTM, nn.GRU], ids=lambda t: t.__name__)
def test_sequence_modules_match_torch_ao(
    ao, float_type, per_channel, dtype, num_layers, bidirectional, batch_first
):
    torch.manual_seed(1)
    float_mod = float_type(
        10, 16, num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first
    )
    ours, theirs = both(ao, float_mod, tie_heavy_qparams(float_mod, per_channel, dtype, seed=2))
    assert ours._get_name() == theirs._get_name()
    for a, b in zip(ours.get_flat_weights(), theirs.get_flat_weights(), strict=True):
        assert torch.equal(a, b)

    batch, steps, states = 4, 7, num_layers * (2 if bidirectional else 1)
    x = torch.randn(batch, steps, 10) if batch_first else torch.randn(steps, batch, 10)
    h = torch.randn(states, batch, 16)
    hx = (h, torch.randn(states, batch, 16)) if float_type is nn.LSTM else h
    unbatched = x[0] if batch_first else x[:, 0]
    unbatched_hx = tuple(s[:, 0] for s in hx) if float_type is nn.LSTM else h[:, 0]
    packed = pack_padded_sequence(
        x, torch.tensor([7, 3, 5, 1]), batch_first=batch_first, enforce_sorted=False
    )
    with torch.no_grad():
        assert_same(ours(x), theirs(x))
        assert_same(ours(x, hx), theirs(x, hx))
        assert_same(ours(unbatched), theirs(unbatched))
        assert_same(ours(unbatched, unbatched_hx), theirs(unbatched, unbatched_hx))
        assert_same(ours(packed), theirs(packed))
        assert_same(ours(packed, hx), theirs(packed, hx))


@pytest.mark.parametrize("float_type", [nn.LSTM, nn.GRU], ids=lambda t: t.__name__)
def test_bias_free_sequence_modules_match_torch_ao(ao, float_type):
    torch.manual_seed(3)
    float_mod = float_type(6, 8, num_layers=2, bias=False, bidirectional=True)
    ours, theirs = both(ao, float_mod, tie_heavy_qparams(float_mod, True, "qint8"))
    x = torch.randn(5, 3, 6)
    with torch.no_grad():
        assert_same(ours(x), theirs(x))


def test_quantized_weight_bias_dict_matches_torch_ao(ao):
    torch.manual_seed(4)
    float_mod = nn.GRU(6, 8, num_layers=2)
    ours, theirs = both(ao, float_mod, tie_heavy_qparams(float_mod, True, "quint8"))
    mine, reference = ours.get_quantized_weight_bias_dict(), theirs.get_quantized_weight_bias_dict()
    assert list(mine) == list(reference)
    for name, value in mine.items():
        if name.startswith("weight"):
            assert torch.equal(value.int_repr(), reference[name].int_repr())
            assert torch.equal(value.dequantize(), reference[name].dequantize())
        else:
            assert value is reference[name]


def test_state_dict_keys_match_torch_ao(ao):
    float_mod = nn.LSTM(4, 6, num_layers=2)
    ours, theirs = both(ao, float_mod, tie_heavy_qparams(float_mod, True, "qint8"))
    assert list(ours.state_dict()) == list(theirs.state_dict())
