"""Recording calibration data from a user's own pipeline: the inputs and initial states every
recurrent module of a model sees, sampled to a bound, written as a calibration file
(:mod:`refq_cli.pipeline.calibration` documents the format).

::

    with record_calibration(model, "calib.safetensors") as recording:
        run_my_pipeline(model)
    print(recording.modules)

Forward hooks (``with_kwargs=True``, so a state passed as ``hx=`` is seen) on every module of
``model`` that is a ``torch.nn`` RNN, LSTM, GRU, RNNCell, LSTMCell or GRUCell (subclasses
included) copy each call's input and initial state to the CPU, detached; they change nothing
the model computes. Calls made through ``module.forward(...)`` directly, or by a scripted
module, pass no hook and are not seen.

What is kept, per module, is at most ``max_rows`` rows (a row is one time step of one sequence;
of a cell, one row of one call), chosen deterministically: each sequence (of a cell: each row)
gets a key from a generator seeded the same for every module, and the sequences with the
smallest keys are kept while their rows fit, the others dropped as they come (memory stays
within the bound). A sequence longer than ``max_rows`` counts as its first ``max_rows`` steps:
the prefix of a sequence is itself a sequence from the same initial state. Kept data is written
in the order it came, so the same pipeline gives the same bytes.

Sequence modules (RNN, LSTM, GRU): each sequence of a batch is its own batch entry; a packed
batch (``PackedSequence``) is unpacked, each sequence kept at its real length with its own
slice of ``h_0``/``c_0`` (in the order the batch was given, as PyTorch reads ``hx``); an
unbatched input is a batch of one. Consecutive kept sequences of the same length (and the same
states given or not) are stored as one call, in the module's layout. Cells: each row of a call
(a decoder step) is independent of the others, so every kept row goes into one call 0, 2-D,
with its state (zeros where a call passed none).

The file is written on leaving the block normally, through :mod:`refq_cli.io.outputs` (an
existing file refused without ``force``, never half a file); the path is checked before the
block runs. On an exception nothing is written. Hooks are removed on leaving, whatever happens.
"""

from __future__ import annotations

import contextlib
import heapq
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from refq_cli.errors import RefqError, argument, shorten
from refq_cli.io.outputs import Outputs, check_outputs
from refq_cli.kinds import display_path
from refq_cli.pipeline.calibration import StoredCall, write_calibration_file

RECURRENT_TYPES: tuple[type[nn.Module], ...] = (
    nn.RNN,
    nn.LSTM,
    nn.GRU,
    nn.RNNCell,
    nn.LSTMCell,
    nn.GRUCell,
)
MAX_ROWS = 8192
_SEED = 0


@dataclass
class ModuleCounts:
    """What one module saw and what was kept of it."""

    float_type: str  # the torch.nn class it is (or derives from)
    batch_first: bool  # False for cells
    calls_seen: int = 0
    rows_seen: int = 0
    rows_kept: int = 0


@dataclass
class Recording:
    """A recording under way (or done): its file, and each recurrent module's counts, by name.

    ``written`` turns True once the file is in place."""

    path: Path
    modules: dict[str, ModuleCounts] = field(default_factory=dict)
    written: bool = False

    @property
    def missing(self) -> list[str]:
        """The recurrent modules that got no row so far (left out of the file)."""
        return [name for name, counts in self.modules.items() if counts.rows_kept == 0]


@contextlib.contextmanager
def record_calibration(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    max_rows: int = MAX_ROWS,
    force: bool = False,
) -> Iterator[Recording]:
    """Record the inputs and initial states of ``model``'s recurrent modules while the block
    runs, and write them to the calibration file ``path`` on leaving it normally (see the
    module's docstring). Yields the :class:`Recording`."""
    if not isinstance(model, nn.Module):
        raise RefqError(
            f"model: got {shorten(type(model).__name__)}; give the torch.nn.Module to record"
        )
    if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
        raise RefqError(
            f"{argument('max_rows', max_rows)}: give a whole number of rows, 1 or more "
            f"(default {MAX_ROWS})"
        )
    if not isinstance(path, (str, os.PathLike)):
        raise RefqError(f"path: got {shorten(path)}; give the calibration file's path")
    path = Path(path)
    recorders = {
        display_path(name): _recorder(module, display_path(name), max_rows)
        for name, module in model.named_modules()
        if isinstance(module, RECURRENT_TYPES)
    }
    if not recorders:
        names = ", ".join(t.__name__ for t in RECURRENT_TYPES)
        raise RefqError(
            f"model: {type(model).__name__} holds no recurrent module; refq records "
            f"torch.nn {names} (and their subclasses)"
        )
    check_outputs({"path": path}, {}, force=force)  # before the pipeline runs for nothing
    recording = Recording(path, {name: r.counts for name, r in recorders.items()})
    handles = []
    try:
        for recorder in recorders.values():
            handles.append(recorder.module.register_forward_hook(recorder.hook, with_kwargs=True))
        yield recording
    finally:
        for handle in handles:
            handle.remove()
    calls = {name: r.stored() for name, r in recorders.items()}
    calls = {name: c for name, c in calls.items() if c}
    if not calls:
        raise RefqError(
            f"{argument('path', path)}: nothing recorded (no recurrent module of the model was "
            f"called inside the with block: {', '.join(recorders)}); nothing was written; run "
            "the model inside the block (module.forward() called directly passes no hook)"
        )
    counts = {
        name: {
            "float_type": c.float_type,
            "batch_first": c.batch_first,
            "calls_seen": c.calls_seen,
            "rows_seen": c.rows_seen,
            "rows_kept": c.rows_kept,
        }
        for name, c in recording.modules.items()
        if name in calls
    }
    with Outputs({"path": path}, {}, force=force) as outputs:
        write_calibration_file(path, calls, modules=counts, outputs=outputs)
        outputs.commit()
    recording.written = True


# --- the sample ---------------------------------------------------------------------------------


class _Sample:
    """A bottom-k sample by rows: of the items seen, those with the smallest keys while their
    rows fit in ``max_rows`` (the first that does not fit, and every later key, is out)."""

    def __init__(self, max_rows: int) -> None:
        self.max_rows = max_rows
        self.rng = random.Random(_SEED)
        self.order = 0  # items seen
        self.rows = 0  # rows kept
        self.cut: tuple[float, int] | None = None  # the smallest key dropped
        self._heap: list[tuple[float, int, int, Any]] = []  # (-key, -order, rows, item)

    def draw(self) -> tuple[float, int]:
        """The next item's key (every item draws one, kept or not)."""
        key = (self.rng.random(), self.order)
        self.order += 1
        return key

    def wants(self, key: tuple[float, int]) -> bool:
        return self.cut is None or key < self.cut

    def add(self, key: tuple[float, int], rows: int, item: Any) -> None:
        if not self.wants(key):
            return
        heapq.heappush(self._heap, (-key[0], -key[1], rows, item))
        self.rows += rows
        while self.rows > self.max_rows:
            neg, neg_order, dropped, _ = heapq.heappop(self._heap)
            self.rows -= dropped
            self.cut = (-neg, -neg_order) if self.cut is None else min(self.cut, (-neg, -neg_order))

    def kept(self) -> list[Any]:
        """The kept items, in the order they came."""
        return [item for *_, item in sorted(self._heap, key=lambda e: -e[1])]


# --- recorders ----------------------------------------------------------------------------------


def _recorder(module: nn.Module, name: str, max_rows: int) -> _Recorder:
    kind = next(t for t in RECURRENT_TYPES if isinstance(module, t))
    cell = issubclass(kind, nn.RNNCellBase)
    counts = ModuleCounts(kind.__name__, False if cell else bool(module.batch_first))
    return (_CellRecorder if cell else _SequenceRecorder)(module, name, counts, max_rows)


def _copied(t: torch.Tensor, dim: int, index: list[int]) -> torch.Tensor:
    """The entries ``index`` of ``t`` along ``dim``, on the CPU, detached, in one copy."""
    chosen = t.detach().index_select(dim, torch.tensor(index, device=t.device))
    return chosen.to("cpu")


class _Recorder:
    def __init__(self, module: nn.Module, name: str, counts: ModuleCounts, max_rows: int) -> None:
        self.module, self.name, self.counts = module, name, counts
        self.max_rows = max_rows
        self.lstm = isinstance(module, (nn.LSTM, nn.LSTMCell))
        self.sample = _Sample(max_rows)

    def hook(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        x = args[0] if args else kwargs.get("input")
        hx = args[1] if len(args) > 1 else kwargs.get("hx")
        with torch.no_grad():
            self.record(x, self._states(hx))
        self.counts.calls_seen += 1
        self.counts.rows_kept = self.sample.rows

    def _states(self, hx: Any) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if hx is None:
            return None, None
        if self.lstm:
            if isinstance(hx, (tuple, list)) and len(hx) == 2:
                h, c = hx
                if isinstance(h, torch.Tensor) and isinstance(c, torch.Tensor):
                    return h, c
        elif isinstance(hx, torch.Tensor):
            return hx, None
        raise self._odd("hx", hx)

    def _odd(self, what: str, value: Any) -> RefqError:
        return RefqError(
            f"record_calibration: module {self.name} ({self.counts.float_type}) was called with "
            f"{what} of type {type(value).__name__}, which torch.nn's forward does not take; "
            "refq records a call's input and hx as torch.nn takes them"
        )

    def record(self, x: Any, states: tuple[torch.Tensor | None, torch.Tensor | None]) -> None:
        raise NotImplementedError

    def _check(self, what: str, t: torch.Tensor | None, expected: tuple[int, ...]) -> None:
        """Refuse a tensor torch.nn's forward would not take: a subclass whose forward takes
        other arguments (``forward(x, lengths)``) gives its own, which refq cannot read."""
        if t is not None and tuple(t.shape) != expected:
            raise RefqError(
                f"record_calibration: module {self.name} ({self.counts.float_type}) was called "
                f"with {what} of shape {tuple(t.shape)}, where its torch.nn forward takes "
                f"{expected}; refq records a call's input and hx as torch.nn's forward takes "
                "them, so a subclass whose forward takes other arguments cannot be recorded"
            )

    def stored(self) -> list[StoredCall]:
        raise NotImplementedError


@dataclass(frozen=True)
class _Sequence:
    input: torch.Tensor  # (time, features)
    h_0: torch.Tensor | None  # (layers*directions, H)
    c_0: torch.Tensor | None

    def group(self) -> tuple[Any, ...]:
        """What consecutive sequences share to be stored as one call."""
        return (
            self.input.shape[0],
            self.input.dtype,
            None if self.h_0 is None else self.h_0.dtype,
            None if self.c_0 is None else self.c_0.dtype,
        )


class _SequenceRecorder(_Recorder):
    def record(self, x: Any, states: tuple[torch.Tensor | None, torch.Tensor | None]) -> None:
        h, c = states
        if isinstance(x, PackedSequence):
            padded, lengths = pad_packed_sequence(x)  # original order, as hx is given
            steps = lengths.tolist()
        elif isinstance(x, torch.Tensor) and x.dim() in (2, 3):
            if x.dim() == 2:  # unbatched: (time, features), hx (layers*directions, H)
                padded = x.unsqueeze(1)
                h = None if h is None else h.unsqueeze(1)
                c = None if c is None else c.unsqueeze(1)
            else:
                padded = x.transpose(0, 1) if self.module.batch_first else x
            steps = [padded.shape[0]] * padded.shape[1]
        else:
            raise self._odd("input", x)
        m, batch = self.module, padded.shape[1]
        layers = m.num_layers * (1 + m.bidirectional)
        self._check("input", padded, (padded.shape[0], batch, m.input_size))
        self._check("h_0", h, (layers, batch, m.proj_size or m.hidden_size))
        self._check("c_0", c, (layers, batch, m.hidden_size))
        wanted = []  # (key, batch entry, rows kept)
        for b, length in enumerate(steps):
            self.counts.rows_seen += length
            key = self.sample.draw()
            if length and self.sample.wants(key):
                wanted.append((key, b, min(length, self.max_rows)))
        if not wanted:
            return
        index = [b for _, b, _ in wanted]
        longest = max(rows for *_, rows in wanted)
        inputs = _copied(padded[:longest], 1, index)
        hs = None if h is None else _copied(h, 1, index)
        cs = None if c is None else _copied(c, 1, index)
        for j, (key, _, rows) in enumerate(wanted):
            item = _Sequence(
                inputs[:rows, j].clone(),
                None if hs is None else hs[:, j].clone(),
                None if cs is None else cs[:, j].clone(),
            )
            self.sample.add(key, rows, item)

    def stored(self) -> list[StoredCall]:
        calls: list[StoredCall] = []
        run: list[_Sequence] = []
        for item in [*self.sample.kept(), None]:
            if run and (item is None or item.group() != run[0].group()):
                calls.append(self._call(run))
                run = []
            if item is not None:
                run.append(item)
        return calls

    def _call(self, run: list[_Sequence]) -> StoredCall:
        x = torch.stack([s.input for s in run], dim=1)  # (time, batch, features)
        if self.module.batch_first:
            x = x.transpose(0, 1).contiguous()
        h = None if run[0].h_0 is None else torch.stack([s.h_0 for s in run], dim=1)  # type: ignore[misc]
        c = None if run[0].c_0 is None else torch.stack([s.c_0 for s in run], dim=1)  # type: ignore[misc]
        return StoredCall(x, h, c)


class _CellRecorder(_Recorder):
    def record(self, x: Any, states: tuple[torch.Tensor | None, torch.Tensor | None]) -> None:
        h, c = states
        if not isinstance(x, torch.Tensor) or x.dim() not in (1, 2):
            raise self._odd("input", x)
        if x.dim() == 1:  # unbatched: (features), hx (hidden)
            x = x.unsqueeze(0)
            h = None if h is None else h.unsqueeze(0)
            c = None if c is None else c.unsqueeze(0)
        batch = x.shape[0]
        self._check("input", x, (batch, self.module.input_size))
        self._check("h_0", h, (batch, self.module.hidden_size))
        self._check("c_0", c, (batch, self.module.hidden_size))
        wanted = []
        for b in range(x.shape[0]):
            self.counts.rows_seen += 1
            key = self.sample.draw()
            if self.sample.wants(key):
                wanted.append((key, b))
        if not wanted:
            return
        index = [b for _, b in wanted]
        inputs = _copied(x, 0, index)
        zeros = torch.zeros(len(index), self.module.hidden_size, dtype=x.dtype)
        hs = zeros if h is None else _copied(h, 0, index)
        cs = None if not self.lstm else zeros if c is None else _copied(c, 0, index)
        for j, (key, _) in enumerate(wanted):
            row = (inputs[j].clone(), hs[j].clone(), None if cs is None else cs[j].clone())
            self.sample.add(key, 1, row)

    def stored(self) -> list[StoredCall]:
        rows = self.sample.kept()
        if not rows:
            return []
        x = torch.stack([r[0] for r in rows])
        h = torch.stack([r[1] for r in rows])
        c = torch.stack([r[2] for r in rows]) if self.lstm else None
        return [StoredCall(x, h, c)]
