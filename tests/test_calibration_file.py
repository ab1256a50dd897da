"""The calibration file format (version 1): reading, checking against modules, splitting."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

from refq_cli.errors import CheckpointError, RefqError, naming_flags
from refq_cli.pipeline.calibration import (
    HELD_OUT_EVERY,
    Call,
    StoredCall,
    batched,
    calls_for,
    held_out_masks,
    read_calibration_file,
    select,
    write_calibration_file,
)


def _file(tmp_path: Path, tensors: dict[str, torch.Tensor], metadata=None, name="c.st") -> Path:
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def _randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))


# --- reading keys ------------------------------------------------------------------------------


def test_no_path_is_no_calibration():
    assert read_calibration_file(None) == {}


def test_a_legacy_key_is_one_call(tmp_path):
    x = _randn(5, 2, 3)
    calls = read_calibration_file(_file(tmp_path, {"rnn": x}))
    assert list(calls) == ["rnn"]
    (stored,) = calls["rnn"]
    assert stored.legacy and stored.key == "rnn" and stored.h_0 is None
    assert torch.equal(stored.input, x)


def test_numbered_calls_come_in_call_order_with_their_states(tmp_path):
    tensors = {f"enc.lstm/input/{i}": _randn(i + 1, 2, 3) for i in range(12)}
    tensors |= {"enc.lstm/h_0/10": _randn(1, 2, 4), "enc.lstm/c_0/10": _randn(1, 2, 4) + 1}
    calls = read_calibration_file(_file(tmp_path, tensors))["enc.lstm"]
    assert [c.input.shape[0] for c in calls] == list(range(1, 13))
    assert [c.key for c in calls] == [f"enc.lstm/input/{i}" for i in range(12)]
    assert torch.equal(calls[10].h_0, tensors["enc.lstm/h_0/10"])
    assert torch.equal(calls[10].c_0, tensors["enc.lstm/c_0/10"])
    assert calls[10].key_of("c_0") == "enc.lstm/c_0/10"
    assert all(c.h_0 is None for i, c in enumerate(calls) if i != 10)


def test_keys_are_read_from_the_right(tmp_path):
    tensors = {
        "a/b/input/0": _randn(2, 1, 3),
        "<root>/input/0": _randn(1, 1, 3),
        "input": _randn(1),
    }
    calls = read_calibration_file(_file(tmp_path, tensors))
    assert sorted(calls) == ["<root>", "a/b", "input"]


def test_a_pt_state_dict_is_read_too(tmp_path):
    path = tmp_path / "c.pt"
    torch.save({"gru/input/0": _randn(3, 2, 4)}, path)
    assert read_calibration_file(path)["gru"][0].input.shape == (3, 2, 4)


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (["m/weird/0"], "'m/weird/0' is not MODULE/ROLE/I"),
        (["m/input/x"], "'m/input/x' is not MODULE/ROLE/I"),
        (["m/input/01"], "'m/input/01' is not MODULE/ROLE/I"),
        (["m/input/-1"], "'m/input/-1' is not MODULE/ROLE/I"),
        (["/input/0"], "'/input/0' is not MODULE/ROLE/I"),
        (["m/input"], "'m/input' lacks its call number; name it 'm/input/0'"),
        (["m/input/0", "m/input/2"], "no 'm/input/1'; number its calls 0, 1, 2"),
        (["m/input/1"], "no 'm/input/0'"),
        (["m", "m/input/0"], "both a legacy input 'm' and call tensors such as 'm/input/0'"),
        (["m/input/0", "m/h_0/1"], "'m/h_0/1' has no input 'm/input/1'"),
        (["m/input/0", "m/c_0/0"], "'m/c_0/0' has no 'm/h_0/0'"),
    ],
)
def test_bad_keys_are_refused_by_name(tmp_path, keys, message):
    path = _file(tmp_path, {k: _randn(2, 1, 3) for k in keys})
    with pytest.raises(RefqError, match=r"^calibration=") as info:
        read_calibration_file(path)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_metadata_version_other_than_1_is_refused(tmp_path):
    x = {"m/input/0": _randn(2, 1, 3)}
    assert read_calibration_file(_file(tmp_path, x, {"refq.calibration.version": "1"}))
    assert read_calibration_file(_file(tmp_path, x, {"format": "pt"}, name="pt.st"))
    path = _file(tmp_path, x, {"refq.calibration.version": "2"}, name="v2.st")
    with pytest.raises(RefqError, match="calibration file version '2'; this refq reads version 1"):
        read_calibration_file(path)


def test_unreadable_files_name_the_argument(tmp_path):
    (tmp_path / "junk").write_bytes(b"not a tensor file")
    with naming_flags(), pytest.raises(CheckpointError, match=r"^--calibration .*junk: "):
        read_calibration_file(tmp_path / "junk")
    with pytest.raises(CheckpointError, match=r"^calibration="):
        read_calibration_file(tmp_path / "missing")
    with pytest.raises(RefqError, match="holds no tensors"):
        read_calibration_file(_file(tmp_path, {}))


# --- checking against modules --------------------------------------------------------------------


def _checked(tmp_path, module, tensors, name="m"):
    return calls_for(module, read_calibration_file(_file(tmp_path, tensors))[name], name)


def test_sequence_calls_become_time_major_on_the_modules_dtype(tmp_path):
    module = nn.LSTM(3, 4, num_layers=2, bidirectional=True, batch_first=True, proj_size=2)
    x = _randn(5, 7, 3).double()  # (batch, time, features)
    h, c = _randn(4, 5, 2), _randn(4, 5, 4)
    (call,) = _checked(tmp_path, module, {"m/input/0": x, "m/h_0/0": h, "m/c_0/0": c})
    assert call.input.dtype == torch.float32 and call.input.is_contiguous()
    assert torch.equal(call.input, x.transpose(0, 1).float())
    assert torch.equal(call.h_0, h) and torch.equal(call.c_0, c)
    assert (call.rows, call.sequences) == (35, 5)


def test_legacy_inputs_keep_their_meaning(tmp_path):
    x = _randn(5, 2, 3)
    (call,) = _checked(tmp_path, nn.GRU(3, 4, batch_first=True), {"m": x})
    assert torch.equal(call.input, x.transpose(0, 1)) and call.h_0 is None
    (call,) = _checked(tmp_path, nn.RNNCell(3, 4), {"m": x})
    assert torch.equal(call.input, x)
    with pytest.raises(RefqError, match=r"3-D \(time, batch, features\).* got shape \(2, 3\)"):
        _checked(tmp_path, nn.RNNCell(3, 4), {"m": x[0]})


def test_cell_calls_are_one_step_or_unrolled(tmp_path):
    cell = nn.LSTMCell(3, 4)
    x, h, c = _randn(6, 3), _randn(6, 4), _randn(6, 4)
    unrolled = _randn(5, 6, 3)
    tensors = {"m/input/0": x, "m/h_0/0": h, "m/c_0/0": c, "m/input/1": unrolled}
    one, two = _checked(tmp_path, cell, tensors)
    assert torch.equal(one.input, x[None]) and torch.equal(one.h_0, h) and (one.rows == 6)
    assert torch.equal(two.input, unrolled) and two.h_0 is None and two.sequences == 6


_GRU = nn.GRU(3, 4, num_layers=2)
_LSTM = nn.LSTM(3, 4)


@pytest.mark.parametrize(
    ("module", "tensors", "message"),
    [
        (
            _GRU,
            {"m/input/0": _randn(5, 3)},
            r"'m/input/0' for m \(GRU\) must be a non-empty 3-D "
            r"\(time, batch, features\) tensor with 3 features, got shape \(5, 3\)",
        ),
        (_GRU, {"m/input/0": _randn(5, 2, 4)}, r"with 3 features, got shape \(5, 2, 4\)"),
        (_GRU, {"m/input/0": torch.zeros(5, 0, 3)}, r"non-empty .* got shape \(5, 0, 3\)"),
        (
            nn.GRU(3, 4, batch_first=True),
            {"m/input/0": _randn(5, 2, 2)},
            r"\(batch, time, features\) tensor with 3 features",
        ),
        (
            _GRU,
            {"m/input/0": _randn(5, 2, 3), "m/h_0/0": _randn(1, 2, 4)},
            r"'m/h_0/0' for m \(GRU\) must be \(num_layers\*directions 2, batch 2 as its input, "
            r"hidden_size 4\), got shape \(1, 2, 4\)",
        ),
        (_GRU, {"m/input/0": _randn(5, 2, 3), "m/h_0/0": _randn(2, 3, 4)}, r"batch 2 as its input"),
        (
            nn.LSTM(3, 4, proj_size=2),
            {"m/input/0": _randn(5, 2, 3), "m/h_0/0": _randn(1, 2, 4), "m/c_0/0": _randn(1, 2, 4)},
            r"'m/h_0/0' .* proj_size 2\), got shape \(1, 2, 4\)",
        ),
        (
            nn.LSTM(3, 4, proj_size=2),
            {"m/input/0": _randn(5, 2, 3), "m/h_0/0": _randn(1, 2, 2), "m/c_0/0": _randn(1, 2, 2)},
            r"'m/c_0/0' .* hidden_size 4\), got shape \(1, 2, 2\)",
        ),
        (
            _GRU,
            {"m/input/0": _randn(5, 2, 3), "m/h_0/0": _randn(2, 2, 4), "m/c_0/0": _randn(2, 2, 4)},
            r"'m/c_0/0': m is a GRU, which takes no c_0; remove it",
        ),
        (
            _LSTM,
            {"m/input/0": _randn(5, 2, 3), "m/h_0/0": _randn(1, 2, 4)},
            r"m \(LSTM\) takes h_0 and c_0 together; add 'm/c_0/0'",
        ),
        (
            _LSTM,
            {"m/input/0": torch.ones(5, 2, 3, dtype=torch.int64)},
            r"'m/input/0' for m holds int64 values; store floating-point values",
        ),
        (
            _LSTM,
            {"m/input/0": _randn(5, 2, 3).index_fill(0, torch.tensor([1]), float("nan"))},
            r"'m/input/0' for m holds NaN or infinite values",
        ),
        (
            _GRU,
            {"m/input/0": _randn(5, 2, 3), "m/h_0/0": torch.full((2, 2, 4), float("inf"))},
            r"'m/h_0/0' for m holds NaN or infinite values",
        ),
        (
            nn.GRUCell(3, 4),
            {"m/input/0": _randn(6, 3), "m/h_0/0": _randn(5, 4)},
            r"'m/h_0/0' for m \(GRUCell\) must be \(batch 6 as its input, hidden_size 4\), got "
            r"shape \(5, 4\)",
        ),
        (
            nn.GRUCell(3, 4),
            {"m/input/0": _randn(6, 2)},
            r"must be a non-empty \(batch, 3 features\) tensor, or \(steps, batch, 3 features\)",
        ),
        (nn.RNNCell(3, 4), {"m/input/0": _randn(2, 6, 2, 3)}, r"got shape \(2, 6, 2, 3\)"),
    ],
)
def test_calls_that_do_not_fit_the_module_are_refused(tmp_path, module, tensors, message):
    with pytest.raises(RefqError, match=r"^calibration='.*c\.st': ") as info:
        _checked(tmp_path, module, tensors)
    assert len(str(info.value).splitlines()) == 1
    assert re.search(message, str(info.value)), str(info.value)


def test_messages_name_the_flag_under_the_cli(tmp_path):
    with naming_flags(), pytest.raises(RefqError, match=r"^--calibration .*c\.st: tensor 'm/"):
        _checked(tmp_path, nn.GRU(3, 4), {"m/input/0": _randn(5, 2, 2)})


# --- writing -------------------------------------------------------------------------------------


def test_written_files_read_back(tmp_path):
    calls = {
        "a/b": [StoredCall(_randn(4, 2, 3), _randn(1, 2, 5)), StoredCall(_randn(1, 3, 3))],
        "<root>": [StoredCall(_randn(6, 3), _randn(6, 4), _randn(6, 4))],
    }
    path = tmp_path / "w.safetensors"
    write_calibration_file(path, calls, modules={"a/b": {"rows_kept": 11}})
    back = read_calibration_file(path)
    assert list(back) == list(calls)
    for name, stored in calls.items():
        for want, got in zip(stored, back[name], strict=True):
            for role in ("input", "h_0", "c_0"):
                a, b = getattr(want, role), getattr(got, role)
                assert (a is None and b is None) or torch.equal(a, b)
    with pytest.raises(RefqError, match="already exists; pass force=True"):
        write_calibration_file(path, calls)


# --- splitting -----------------------------------------------------------------------------------


def _calls(batches: list[int], cell: bool = False) -> list[Call]:
    out, start = [], 0
    for batch in batches:
        ids = torch.arange(start, start + batch, dtype=torch.float32)
        start += batch
        x = ids[None, :, None].expand(3, batch, 2).clone()
        h = ids[:, None].expand(batch, 4).clone() if cell else ids[None, :, None].repeat(2, 1, 4)
        out.append(Call(x, h, h + 0.5))
    return out


def split_held_out(calls, every=HELD_OUT_EVERY):
    """(fit, held_out) calls, as the converter takes them apart."""
    masks = held_out_masks(calls, every)
    fit = [select(c, ~m) for c, m in zip(calls, masks, strict=True) if bool((~m).any())]
    held = [select(c, m) for c, m in zip(calls, masks, strict=True) if bool(m.any())]
    return fit, held


def _ids(calls: list[Call]) -> list[int]:
    return [int(v) for c in calls for v in c.input[0, :, 0].tolist()]


@pytest.mark.parametrize("cell", [False, True])
def test_every_eighth_sequence_is_held_out_with_its_states(cell):
    fit, held = split_held_out(_calls([5, 9, 1, 3], cell))
    assert _ids(held) == [7, 15] and _ids(fit) == [i for i in range(18) if i not in (7, 15)]
    for call in fit + held:
        ids = call.input[0, :, 0]
        h = call.h_0[:, 0] if cell else call.h_0[0, :, 0]
        assert torch.equal(h, ids) and torch.equal(call.c_0, call.h_0 + 0.5)
    assert [c.sequences for c in held] == [1, 1]
    assert split_held_out(_calls([5, 9, 1, 3], cell))[1][0].input.equal(held[0].input)


def test_few_sequences_hold_nothing_out():
    calls = _calls([3, 4])
    fit, held = split_held_out(calls)
    assert held == [] and _ids(fit) == _ids(calls) and len(fit) == len(calls)
    assert split_held_out([], 8) == ([], [])
    with pytest.raises(ValueError, match="positive int"):
        split_held_out(calls, 0)


@given(st.lists(st.integers(1, 20), max_size=8), st.integers(1, 10))
def test_split_keeps_every_sequence_once_in_order(batches, every):
    fit, held = split_held_out(_calls(batches), every)
    total = sum(batches)
    assert _ids(held) == [i for i in range(total) if i % every == every - 1]
    assert _ids(fit) == [i for i in range(total) if i % every != every - 1]
    assert all(c.sequences > 0 for c in fit + held)
    assert HELD_OUT_EVERY == 8


def _with_steps(call: Call, steps: int, states: bool) -> Call:
    x = call.input[:1].expand(steps, -1, -1).clone()
    return Call(x, call.h_0 if states else None, call.c_0 if states else None)


@pytest.mark.parametrize("cell", [False, True])
def test_calls_of_one_length_and_states_are_batched_with_their_masks(cell):
    shapes = [(3, True), (5, True), (3, True), (3, False), (5, True), (3, False)]
    calls = [
        _with_steps(c, steps, states)
        for c, (steps, states) in zip(_calls([2, 1, 3, 2, 4, 1], cell), shapes, strict=True)
    ]
    masks = held_out_masks(calls, 3)
    joined, joined_masks = batched(calls, masks)
    groups = [[0, 2], [1, 4], [3, 5]]  # by steps and states, in the order of their first call
    assert len(joined) == 3
    for call, mask, members in zip(joined, joined_masks, groups, strict=True):
        assert _ids([call]) == [i for m in members for i in _ids([calls[m]])]
        assert torch.equal(mask, torch.cat([masks[m] for m in members]))
        assert call.input.shape[0] == calls[members[0]].input.shape[0]
        for role in ("h_0", "c_0"):
            got, parts = getattr(call, role), [getattr(calls[m], role) for m in members]
            if parts[0] is None:
                assert got is None
            else:
                assert torch.equal(got, torch.cat(parts, dim=parts[0].dim() - 2))
    alone = [Call(torch.zeros(2, 1, 2))]
    assert batched(alone, [torch.zeros(1, dtype=torch.bool)])[0][0] is alone[0]
