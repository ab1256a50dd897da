"""Recording calibration data from a model's own calls: every module type and input form, the
row bound, unchanged outputs, and the round trip record -> read -> replay."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from refq_cli.errors import ArtifactError, RefqError
from refq_cli.pipeline.calibration import Call, calls_for, read_calibration_file
from refq_cli.pipeline.record import Recording, record_calibration

F, H = 3, 4  # features, hidden size


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Net(nn.Module):
    """A model holding one recurrent module ``rnn`` inside a wrapper, as real models do."""

    def __init__(self, rnn: nn.Module) -> None:
        super().__init__()
        self.enc = nn.Module()
        self.enc.rnn = rnn
        self.head = nn.Linear(1, 1)


def _sequence_module(kind: str, batch_first: bool = False, **extra) -> nn.Module:
    torch.manual_seed(0)
    cls = getattr(nn, kind)
    return cls(F, H, num_layers=2, bidirectional=True, batch_first=batch_first, **extra).eval()


def _state(module: nn.Module, batch: int | None, gen: torch.Generator):
    """A random hx for ``module`` (unbatched when ``batch`` is None)."""
    stacks = module.num_layers * 2
    size = getattr(module, "proj_size", 0) or H
    shape = (stacks, size) if batch is None else (stacks, batch, size)
    h = torch.randn(*shape, generator=gen)
    if isinstance(module, nn.LSTM):
        return h, torch.randn(*shape[:-1], H, generator=gen)
    return h


# Each pipeline runs the module several times and returns, per sequence it ran (in the order
# given), its input (time, features) and its output (time, H_out), time-major.
def _run_sequences(module: nn.Module, form: str, gen: torch.Generator):
    seen = []
    bf = module.batch_first
    for call, length in enumerate((5, 2, 7)):
        hx = _state(module, 3, gen) if call != 1 else None
        if form.startswith("packed"):
            lengths = (
                [length, 1, length + 1] if form == "packed_unsorted" else [length + 1, length, 1]
            )
            padded = torch.randn(max(lengths), 3, F, generator=gen)
            packed = pack_padded_sequence(
                padded, torch.tensor(lengths), enforce_sorted=form == "packed_sorted"
            )
            out, _ = module(packed, hx)
            out, got_lengths = pad_packed_sequence(out)
            assert got_lengths.tolist() == lengths
            seen += [(padded[:n, b], out[:n, b]) for b, n in enumerate(lengths)]
        elif form == "unbatched":
            x = torch.randn(length, F, generator=gen)
            h = None if hx is None else _state(module, None, gen)
            out, _ = module(x, h)
            seen.append((x, out))
        else:
            x = torch.randn(length, 3, F, generator=gen)
            given = x.transpose(0, 1) if bf else x
            out, _ = module(given, hx=hx) if form == "hx_keyword" else module(given, hx)
            out = out.transpose(0, 1) if bf else out
            seen += [(x[:, b], out[:, b]) for b in range(3)]
    return seen


def _replay_sequences(module: nn.Module, calls: list[Call]):
    replayed = []
    for call in calls:
        hx = None if call.h_0 is None else call.h_0 if call.c_0 is None else (call.h_0, call.c_0)
        x = call.input.transpose(0, 1) if module.batch_first else call.input
        with torch.no_grad():
            out, _ = module(x, hx)
        out = out.transpose(0, 1) if module.batch_first else out
        replayed += [(call.input[:, b], out[:, b]) for b in range(call.sequences)]
    return replayed


def _cell(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return getattr(nn, kind)(F, H).eval()


def _run_cell(cell: nn.Module, form: str, gen: torch.Generator):
    """A decoder: each call one step; returns per row (input, h_0 row or None, output row)."""
    seen = []
    lstm = isinstance(cell, nn.LSTMCell)
    for length, batch in ((4, 2), (3, 5)):
        hx = None
        for _ in range(length):
            if form == "unbatched":
                x = torch.randn(F, generator=gen)
                out = cell(x, hx)
                h_in = hx
                hx = out
                seen.append((x, None if h_in is None else h_in, out))
                continue
            x = torch.randn(batch, F, generator=gen)
            if form == "state_keyword" and hx is None:
                hx = torch.randn(batch, H, generator=gen)
                hx = (hx, hx * 2) if lstm else hx
            out = cell(x, hx=hx) if form == "state_keyword" else cell(x, hx)
            seen += [
                (x[b], None if hx is None else _rows(hx, b), _rows(out, b)) for b in range(batch)
            ]
            hx = out
    return seen


def _rows(state, b):
    return tuple(s[b] for s in state) if isinstance(state, tuple) else state[b]


def _first(t):
    return t[0] if isinstance(t, tuple) else t


SEQUENCE_FORMS = [
    ("RNN", False, "positional"),
    ("GRU", True, "positional"),
    ("LSTM", False, "hx_keyword"),
    ("LSTM", True, "positional"),
    ("GRU", False, "packed_sorted"),
    ("LSTM", False, "packed_unsorted"),
    ("LSTM", True, "packed_unsorted"),
    ("RNN", True, "packed_unsorted"),
    ("GRU", False, "unbatched"),
    ("LSTM", True, "unbatched"),
]


@pytest.mark.parametrize(("kind", "batch_first", "form"), SEQUENCE_FORMS)
def test_sequence_calls_replay_to_what_the_pipeline_got(tmp_path, kind, batch_first, form):
    module = _sequence_module(kind, batch_first)
    model = Net(module)
    path = tmp_path / "calib.safetensors"
    with record_calibration(model, path) as recording:
        seen = _run_sequences(module, form, _gen())
    assert recording.written and recording.missing == []
    counts = recording.modules["enc.rnn"]
    assert counts.float_type == kind and counts.batch_first == batch_first
    assert counts.calls_seen == 3
    assert counts.rows_seen == counts.rows_kept == sum(len(x) for x, _ in seen)
    stored = read_calibration_file(path)["enc.rnn"]
    if batch_first:  # stored in the module's layout
        assert stored[0].input.shape[0] == calls_for(module, stored[:1], "enc.rnn")[0].sequences
    calls = calls_for(module, stored, "enc.rnn")
    replayed = _replay_sequences(module, calls)
    assert len(replayed) == len(seen)
    for (x, out), (x_again, out_again) in zip(seen, replayed, strict=True):
        assert torch.equal(x, x_again)
        torch.testing.assert_close(out_again, out, rtol=1e-5, atol=1e-6)


def test_packed_states_follow_their_sequences(tmp_path):
    """An unsorted packed batch: each sequence's h_0 slice is the one given for it."""
    module = _sequence_module("GRU")
    lengths = [2, 6, 4]
    padded = torch.randn(6, 3, F, generator=_gen())
    h = torch.arange(3.0)[None, :, None].expand(4, 3, H).contiguous()  # h_0 of sequence b is b
    with record_calibration(module, tmp_path / "c.st"):
        module(pack_padded_sequence(padded, torch.tensor(lengths), enforce_sorted=False), h)
    calls = calls_for(module, read_calibration_file(tmp_path / "c.st")["<root>"], "<root>")
    assert [c.input.shape[0] for c in calls] == lengths  # arrival order, real lengths
    for b, call in enumerate(calls):
        assert torch.equal(call.input[:, 0], padded[: lengths[b], b])
        assert torch.equal(call.h_0[:, 0], h[:, b])


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
def test_lstm_with_projections_records_its_states(tmp_path):
    module = _sequence_module("LSTM", proj_size=2)
    with record_calibration(Net(module), tmp_path / "c.st"):
        seen = _run_sequences(module, "positional", _gen())
    calls = calls_for(module, read_calibration_file(tmp_path / "c.st")["enc.rnn"], "enc.rnn")
    assert calls[0].h_0.shape == (4, 3, 2) and calls[0].c_0.shape == (4, 3, H)
    for (_, out), (_, again) in zip(seen, _replay_sequences(module, calls), strict=True):
        torch.testing.assert_close(again, out, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["RNNCell", "LSTMCell", "GRUCell"])
@pytest.mark.parametrize("form", ["no_state_first", "state_keyword", "unbatched"])
def test_cell_rows_replay_to_what_the_pipeline_got(tmp_path, kind, form):
    cell = _cell(kind)
    path = tmp_path / "calib.safetensors"
    with record_calibration(Net(cell), path) as recording:
        seen = _run_cell(cell, form, _gen())
    counts = recording.modules["enc.rnn"]
    assert counts.calls_seen == 7 and counts.rows_seen == counts.rows_kept == len(seen)
    stored = read_calibration_file(path)["enc.rnn"]
    assert len(stored) == 1 and stored[0].input.shape == (len(seen), F)
    assert stored[0].h_0.shape == (len(seen), H)
    assert (stored[0].c_0 is not None) == (kind == "LSTMCell")
    (call,) = calls_for(cell, stored, "enc.rnn")
    hx = call.h_0 if call.c_0 is None else (call.h_0, call.c_0)
    with torch.no_grad():
        out = cell(call.input[0], hx)
    for row, (x, h_in, expected) in enumerate(seen):
        assert torch.equal(call.input[0, row], x)
        if h_in is None:  # no state given: zeros recorded
            assert not call.h_0[row].any()
        else:
            assert torch.equal(call.h_0[row], _first(h_in))
        torch.testing.assert_close(_first(out)[row], _first(expected), rtol=1e-5, atol=1e-6)


# --- the row bound -------------------------------------------------------------------------------


def _pipeline(model: nn.Module) -> None:
    gen = _gen(3)
    for length in (9, 1, 4, 12, 3, 30, 2):
        model.seq(torch.randn(length, 4, F, generator=gen))
        hx = None
        for _ in range(length):
            hx = model.cell(torch.randn(2, F, generator=gen), hx)


def _two_modules() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Module()
    model.seq, model.cell = nn.GRU(F, H), nn.LSTMCell(F, H)
    model.unused = nn.RNN(F, H)
    return model


def test_rows_kept_stay_within_the_bound_and_bytes_repeat(tmp_path):
    model = _two_modules()
    files = []
    for run in range(2):
        path = tmp_path / f"run{run}.safetensors"
        with record_calibration(model, path, max_rows=20) as recording:
            _pipeline(model)
        files.append(path.read_bytes())
        assert recording.missing == ["unused"]
        for name in ("seq", "cell"):
            assert 0 < recording.modules[name].rows_kept <= 20
        assert recording.modules["seq"].rows_seen == 4 * 61
        assert recording.modules["cell"].rows_seen == 2 * 61
    assert files[0] == files[1]
    calls = read_calibration_file(tmp_path / "run0.safetensors")
    assert sorted(calls) == ["cell", "seq"]  # a module never called is left out
    for name, stored in calls.items():
        rows = sum(c.rows for c in calls_for(getattr(model, name), stored, name))
        assert rows == recording.modules[name].rows_kept
    with safe_open(str(tmp_path / "run0.safetensors"), "pt") as f:
        metadata = f.metadata()
    assert metadata["format"] == "refq.calibration"
    assert metadata["refq.calibration.version"] == "1"
    modules = json.loads(metadata["refq.calibration.modules"])
    assert list(modules) == ["cell", "seq"]
    assert modules["seq"] == {
        "batch_first": False,
        "calls_seen": 7,
        "float_type": "GRU",
        "rows_kept": recording.modules["seq"].rows_kept,
        "rows_seen": 244,
    }


def test_a_sequence_longer_than_the_bound_keeps_its_first_steps(tmp_path):
    module = _sequence_module("GRU", batch_first=True)
    x = torch.randn(1, 50, F, generator=_gen())
    with record_calibration(module, tmp_path / "c.st", max_rows=16) as recording:
        module(x)
    (stored,) = read_calibration_file(tmp_path / "c.st")["<root>"]
    assert torch.equal(stored.input, x[:, :16])
    assert recording.modules["<root>"].rows_seen == 50
    assert recording.modules["<root>"].rows_kept == 16


def test_kept_sequences_are_a_sample_in_arrival_order(tmp_path):
    module = _sequence_module("RNN")
    gen = _gen()
    inputs = [torch.randn(3, 5, F, generator=gen) for _ in range(20)]  # 100 sequences of 3 steps
    with record_calibration(module, tmp_path / "c.st", max_rows=30):
        for x in inputs:
            module(x)
    calls = read_calibration_file(tmp_path / "c.st")["<root>"]
    kept = [c.input[:, b] for c in calls for b in range(c.input.shape[1])]
    assert len(kept) == 10
    every = [x[:, b] for x in inputs for b in range(5)]
    positions = [next(i for i, s in enumerate(every) if torch.equal(s, k)) for k in kept]
    assert positions == sorted(positions) and positions[-1] > 50  # spread, not the first ten


# --- the model's own computation -----------------------------------------------------------------


def test_outputs_are_unchanged_in_train_mode_with_grad(tmp_path):
    torch.manual_seed(0)
    module = nn.LSTM(F, H, num_layers=2, dropout=0.5).train()
    x = torch.randn(6, 2, F, requires_grad=True)
    torch.manual_seed(1)
    expected, _ = module(x)
    torch.manual_seed(1)
    with record_calibration(module, tmp_path / "c.st"):
        got, _ = module(x)
    assert torch.equal(got, expected) and got.requires_grad
    got.sum().backward()
    assert x.grad is not None
    (stored,) = read_calibration_file(tmp_path / "c.st")["<root>"]
    assert not stored.input.requires_grad and torch.equal(stored.input, x.detach())


def test_outputs_are_unchanged_under_no_grad(tmp_path):
    model = _two_modules().eval()
    with torch.no_grad():
        torch.manual_seed(5)
        expected = [model.seq(torch.randn(4, 2, F))[0], model.cell(torch.randn(2, F))[1]]
        torch.manual_seed(5)
        with record_calibration(model, tmp_path / "c.st"):
            got = [model.seq(torch.randn(4, 2, F))[0], model.cell(torch.randn(2, F))[1]]
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def test_hooks_go_and_nothing_is_written_on_an_exception(tmp_path):
    model = _two_modules()
    path = tmp_path / "c.st"
    with pytest.raises(KeyError), record_calibration(model, path):
        assert _hooks(model) == 3
        model.seq(torch.randn(2, 1, F))
        raise KeyError("the pipeline failed")
    assert _hooks(model) == 0
    assert os.listdir(tmp_path) == []
    with record_calibration(model, path):
        model.seq(torch.randn(2, 1, F))
    assert _hooks(model) == 0 and path.exists()


def test_an_existing_file_is_refused_before_the_block_runs(tmp_path):
    model = _two_modules()
    path = tmp_path / "c.st"
    path.write_bytes(b"keep me")
    ran = []
    with (
        pytest.raises(ArtifactError, match=r"^path=.*c\.st': already exists; pass force=True"),
        record_calibration(model, path),
    ):
        ran.append(True)
    assert ran == [] and path.read_bytes() == b"keep me" and _hooks(model) == 0
    with record_calibration(model, path, force=True):
        model.cell(torch.randn(1, F))
    assert list(read_calibration_file(path)) == ["cell"]
    (tmp_path / "a-file").write_text("")
    with (
        pytest.raises(ArtifactError, match="is not a directory"),
        record_calibration(model, tmp_path / "a-file" / "x.st"),
    ):
        ran.append(True)
    assert ran == []


def test_nothing_recorded_is_refused_and_writes_nothing(tmp_path):
    model = _two_modules()
    with (
        pytest.raises(RefqError, match=r"nothing recorded .*seq, cell, unused.*nothing was writ"),
        record_calibration(model, tmp_path / "c.st") as recording,
    ):
        model.head = None
    assert isinstance(recording, Recording) and recording.missing == ["seq", "cell", "unused"]
    assert not recording.written and os.listdir(tmp_path) == [] and _hooks(model) == 0


@pytest.mark.parametrize("max_rows", [0, -3, 1.5, True, "8"])
def test_bad_max_rows_are_refused(tmp_path, max_rows):
    with (
        pytest.raises(RefqError, match=r"^max_rows=.*: give a whole number of rows, 1 or more"),
        record_calibration(_two_modules(), tmp_path / "c.st", max_rows=max_rows),
    ):
        pass


def test_a_model_without_recurrent_modules_is_refused(tmp_path):
    with (
        pytest.raises(
            RefqError,
            match=r"Sequential holds no recurrent module; refq records .*"
            r"RNN, LSTM, GRU, RNNCell, LSTMCell, GRUCell",
        ),
        record_calibration(nn.Sequential(nn.Linear(2, 2)), tmp_path / "c.st"),
    ):
        pass


def test_subclasses_are_recorded_as_their_torch_kind(tmp_path):
    class MyGRU(nn.GRU):
        pass

    module = MyGRU(F, H)
    with record_calibration(module, tmp_path / "c.st") as recording:
        module(torch.randn(2, 1, F))
    assert recording.modules["<root>"].float_type == "GRU"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_inputs_are_copied_to_the_cpu(tmp_path):
    module = _sequence_module("LSTM").cuda()
    x = torch.randn(5, 2, F, device="cuda")
    hx = tuple(s.cuda() for s in _state(module, 2, _gen()))
    with record_calibration(module, tmp_path / "c.st"):
        expected, _ = module(x, hx)
    (call,) = calls_for(module, read_calibration_file(tmp_path / "c.st")["<root>"], "<root>")
    assert call.input.device.type == "cuda"
    torch.testing.assert_close(module(call.input, (call.h_0, call.c_0))[0], expected)


class _PackingGRU(nn.GRU):
    def forward(self, x, lengths):  # another signature than torch.nn's
        packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
        return pad_packed_sequence(super().forward(packed)[0])[0]


class _WrongCell(nn.GRUCell):
    def forward(self, x, scale):
        return super().forward(x * scale.unsqueeze(1))


@pytest.mark.parametrize(
    ("module", "args", "what"),
    [
        (
            _PackingGRU(4, 8),
            (torch.randn(5, 3, 4), torch.tensor([5, 3, 2])),
            r"h_0 of shape \(3,\)",
        ),
        (_WrongCell(4, 8), (torch.randn(3, 4), torch.rand(3)), r"h_0 of shape \(3,\)"),
    ],
)
def test_a_subclass_with_another_forward_is_refused_in_one_line(tmp_path, module, args, what):
    # it once failed with a bare IndexError from deep inside the recorder
    model = nn.Module()
    model.rnn = module
    with (
        pytest.raises(
            RefqError,
            match=rf"^record_calibration: module rnn \(GRU\w*\) was called "
            rf"with {what}, where its torch.nn forward takes .*cannot be recorded$",
        ),
        record_calibration(model, tmp_path / "c.st"),
    ):
        model.rnn(*args)
    assert not (tmp_path / "c.st").exists()
