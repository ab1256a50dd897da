"""Calibration files: the inputs (and initial states) a model's recurrent modules saw, by module.

Calibration file, version 1
===========================

A safetensors file (a ``torch.save`` state dict of tensors is read too), written by
:func:`refq_cli.pipeline.record.record_calibration` or by hand. Modules are named as refq names
them everywhere (:func:`refq_cli.kinds.display_path`): PyTorch's module path
(``named_modules()``), ``<root>`` for the root module. Tensor keys:

``MODULE``
    The legacy form: one input, in the module's layout: ``(time, batch, features)``, or
    ``(batch, time, features)`` for a ``batch_first`` RNN, LSTM or GRU; for a cell
    ``(time, batch, features)``, unrolled from a zero state, feeding back its own state.
``MODULE/input/I``, and optionally ``MODULE/h_0/I``, ``MODULE/c_0/I``
    Call ``I`` of the module: ``I`` is a decimal number without leading zeros, and a module's
    calls are numbered ``0, 1, 2, ...`` without gaps (so that a lost tensor is noticed).
    Keys are read from the right (the last two ``/``), so a module whose name holds ``/`` is
    still named. For an RNN, LSTM or GRU: ``input`` is 3-D in the module's layout (as above);
    ``h_0`` is ``(num_layers * num_directions, batch, proj_size or hidden_size)`` and ``c_0``
    (LSTM only) ``(num_layers * num_directions, batch, hidden_size)``, exactly as PyTorch's
    ``forward`` takes them; no ``h_0`` means zeros. For a cell: ``input`` is
    ``(batch, input_size)`` and ``h_0`` (and ``c_0``, LSTMCell only) ``(batch, hidden_size)``:
    one step, each row independent of the others; a 3-D ``(steps, batch, input_size)`` input
    is also taken, unrolled from ``h_0`` (or zeros), feeding back its own state. An LSTM or
    LSTMCell takes ``h_0`` and ``c_0`` together or neither.

Every tensor is floating point, finite, and has no empty dimension; states agree with their
input's batch. A stored call is a batch of independent sequences (or rows), not necessarily
one call of the pipeline it was recorded from: the recorder stores sequences of equal length
side by side, and a sequence cut at ``max_rows`` steps is its first steps (a prefix of a
sequence is itself a sequence from the same ``h_0``).

Refused: a module with both a legacy ``MODULE`` key and ``MODULE/input/I`` keys; ``h_0`` or
``c_0`` without the ``input`` of its call, ``c_0`` without ``h_0``; a gap in the numbering; any
other key ending in ``/input``, ``/h_0`` or ``/c_0``, or whose last two parts look like a role
and a number but are not (``MODULE/weird/0``, ``MODULE/input/x``, ``MODULE/input/01``).

Metadata (optional; hand-written files have none, and readers do not need it), as the recorder
writes it: ``format: refq.calibration``, ``refq.calibration.version: "1"`` and
``refq.calibration.modules``, JSON with sorted keys: ``{name: {"float_type", "batch_first",
"calls_seen", "rows_seen", "rows_kept"}}`` (a row is one time step of one sequence; of a cell,
one row of one call). A file whose ``refq.calibration.version`` is not ``"1"`` is refused.

In memory
=========

:func:`read_calibration_file` gives each module's :class:`StoredCall` records, tensors as the
file holds them (a module's layout is known only once its module is); :func:`calls_for` checks
them against the float module and gives canonical :class:`Call` objects: time-major, on the
module's device and dtype. :func:`held_out_masks` and :func:`select` take the held-out
sequences apart, :func:`batched` stacks calls of one length into one call;
:func:`write_calibration_file` writes a file of this format.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from refq_cli.errors import CheckpointError, RefqError, argument, shorten, strict_json
from refq_cli.io.checkpoint import read_tensors
from refq_cli.io.outputs import Outputs
from refq_cli.io.safetensors_writer import SafetensorsWriter

FORMAT = "refq.calibration"
VERSION = "1"
FORMAT_KEY = "format"
VERSION_KEY = "refq.calibration.version"
MODULES_KEY = "refq.calibration.modules"
ROLES = ("input", "h_0", "c_0")
HELD_OUT_EVERY = 8


@dataclass(frozen=True)
class StoredCall:
    """One call of a module as a calibration file holds it: tensors as stored (the module's
    layout; a cell's input 2-D or 3-D), not yet checked against any module."""

    input: torch.Tensor
    h_0: torch.Tensor | None = None
    c_0: torch.Tensor | None = None
    key: str = ""  # the input's key in the file: MODULE (legacy) or MODULE/input/I
    source: str | Path | None = None  # the file it came from, for messages
    recorded: Mapping[str, Any] | None = None  # what the recorder noted of the module, if it did

    @property
    def legacy(self) -> bool:
        """Whether this is a legacy ``MODULE`` input (no states, a cell's input unrolled)."""
        parts = self.key.rsplit("/", 2)
        return not (len(parts) == 3 and parts[1] == "input")

    def key_of(self, role: str) -> str:
        """The key of this call's ``input``, ``h_0`` or ``c_0``."""
        if role == "input" or self.legacy:
            return self.key
        module, _, index = self.key.rsplit("/", 2)
        return f"{module}/{role}/{index}"


@dataclass(frozen=True)
class Call:
    """One call of a module, canonical: ``input`` is (time, batch, features), time-major
    whatever the module's layout (a cell's one-step call is (1, batch, features)); ``h_0`` and
    ``c_0`` are (num_layers * num_directions, batch, H) for an RNN, LSTM or GRU, (batch,
    hidden_size) for a cell, or None (zeros)."""

    input: torch.Tensor
    h_0: torch.Tensor | None = None
    c_0: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        """Time steps times sequences."""
        return self.input.shape[0] * self.input.shape[1]

    @property
    def sequences(self) -> int:
        """The batch: independent sequences (of a cell: rows, or unrolled sequences)."""
        return self.input.shape[1]


# --- reading ------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class CalibrationInputs(Mapping[str, list[StoredCall]]):
    """Each module's calls, by module name, and the sha256 of the file's bytes they were read
    from (None: no file)."""

    calls: dict[str, list[StoredCall]]
    sha256: str | None = None

    def __getitem__(self, name: str) -> list[StoredCall]:
        return self.calls[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.calls)

    def __len__(self) -> int:
        return len(self.calls)


def read_calibration_file(path: str | Path | None) -> CalibrationInputs:
    """Each module's calls in the calibration file ``path`` (none for None), in call order, by
    module name; keys and metadata checked, tensors as stored (:func:`calls_for` checks them
    against a module). Messages name the argument (``--calibration PATH``)."""
    if path is None:
        return CalibrationInputs({})
    where = argument("calibration", path)
    try:
        fmt, sha256, tensors = read_tensors(path, what="calibration")
        metadata = _metadata(Path(path)) if fmt == "safetensors" else {}
    except CheckpointError as exc:
        text, named = str(exc), str(path)
        if text.startswith(named + ":"):
            text = where + text[len(named) :]
        raise CheckpointError(text) from None
    version = metadata.get(VERSION_KEY)
    if version is not None and version != VERSION:
        raise RefqError(
            f"{where}: calibration file version {shorten(version)}; this refq reads version "
            f"{VERSION}: record it again with this refq"
        )
    if not tensors:
        raise RefqError(f"{where}: holds no tensors; record calibration data into it first")
    legacy: dict[str, str] = {}
    found: dict[str, dict[int, dict[str, tuple[str, torch.Tensor]]]] = {}
    for key, tensor in tensors.items():
        parsed = _parse_key(where, key)
        if parsed is None:
            legacy[key] = key
            found.setdefault(key, {})
            continue
        module, role, index = parsed
        found.setdefault(module, {}).setdefault(index, {})[role] = (key, tensor)
    calls: dict[str, list[StoredCall]] = {}
    for module, numbered in found.items():
        if module in legacy:
            if numbered:
                key = next(k for roles in numbered.values() for k, _ in roles.values())
                raise RefqError(
                    f"{where}: module {shorten(module)} has both a legacy input {shorten(module)} "
                    f"and call tensors such as {shorten(key)}; keep one form"
                )
            calls[module] = [StoredCall(tensors[module], key=module, source=path)]
            continue
        calls[module] = _numbered_calls(where, path, module, numbered)
    return CalibrationInputs(_with_recorded(calls, metadata.get(MODULES_KEY)), sha256)


def without_prefix(
    calls: Mapping[str, list[StoredCall]], prefix: str | None
) -> Mapping[str, list[StoredCall]]:
    """The calls with a wrapper's prefix (``model.``, the spec's ``strip_prefix``) taken off
    the names that start with it: recorded from the wrapper, named as its checkpoint's keys
    are once stripped."""
    if not prefix:
        return calls
    return {n.removeprefix(prefix): c for n, c in calls.items()}


def _with_recorded(
    calls: dict[str, list[StoredCall]], text: str | None
) -> dict[str, list[StoredCall]]:
    """The calls, each with what the recorder noted of its module (its type, batch_first)."""
    try:
        noted = json.loads(text) if text is not None else {}
    except (ValueError, RecursionError):
        noted = {}
    if not isinstance(noted, dict):
        noted = {}
    return {
        name: [
            replace(c, recorded=noted[name]) if isinstance(noted.get(name), dict) else c
            for c in stored
        ]
        for name, stored in calls.items()
    }


def _metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {})
    except Exception as exc:  # the file was read a moment ago: it changed since
        raise CheckpointError(f"{path}: cannot read its metadata: {exc}") from None


def _is_index(text: str) -> bool:
    return text.isascii() and text.isdigit() and (text == "0" or not text.startswith("0"))


def _parse_key(where: str, key: str) -> tuple[str, str, int] | None:
    """(module, role, call) of a ``MODULE/ROLE/I`` key; None for a legacy ``MODULE`` key."""
    parts = key.rsplit("/", 2)
    if len(parts) == 3 and (parts[1] in ROLES or (parts[2].isascii() and parts[2].isdigit())):
        module, role, index = parts
        if role not in ROLES or not _is_index(index) or not module:
            raise RefqError(
                f"{where}: key {shorten(key)} is not MODULE/ROLE/I (ROLE one of "
                f"{', '.join(ROLES)}; I a call number 0, 1, 2, ... without leading zeros); "
                "rename it"
            )
        return module, role, int(index)
    if len(parts) > 1 and parts[-1] in ROLES:
        raise RefqError(
            f"{where}: key {shorten(key)} lacks its call number; name it {shorten(key + '/0')} "
            "(MODULE/ROLE/I)"
        )
    return None


def _numbered_calls(
    where: str,
    path: str | Path,
    module: str,
    numbered: dict[int, dict[str, tuple[str, torch.Tensor]]],
) -> list[StoredCall]:
    calls = []
    for index in range(len(numbered)):
        roles = numbered.get(index)
        if roles is None:
            raise RefqError(
                f"{where}: module {shorten(module)} has calls up to "
                f"{max(numbered)} but no {shorten(f'{module}/input/{index}')}; number its calls "
                "0, 1, 2, ... without gaps"
            )
        if "input" not in roles:
            key = next(k for k, _ in roles.values())
            raise RefqError(
                f"{where}: {shorten(key)} has no input {shorten(f'{module}/input/{index}')}; "
                "add it or remove the state"
            )
        if "c_0" in roles and "h_0" not in roles:
            raise RefqError(
                f"{where}: {shorten(roles['c_0'][0])} has no "
                f"{shorten(f'{module}/h_0/{index}')}; an LSTM takes h_0 and c_0 together"
            )
        key, x = roles["input"]
        h_0 = roles["h_0"][1] if "h_0" in roles else None
        c_0 = roles["c_0"][1] if "c_0" in roles else None
        calls.append(StoredCall(x, h_0, c_0, key=key, source=path))
    return calls


# --- checking against a module ----------------------------------------------------------------


def calls_for(module: nn.Module, calls: Sequence[StoredCall], name: str) -> list[Call]:
    """The calls of module ``name`` (its display name), checked against the float ``module``
    (features, hidden sizes, layers and directions, the batch of input and states, non-empty,
    floating point, finite), canonical and on the module's device and dtype."""
    weight = next(module.parameters())
    for stored in calls[:1]:
        _check_recorded(module, stored, name)
    return [_canonical(module, stored, name, weight) for stored in calls]


def _check_recorded(module: nn.Module, stored: StoredCall, name: str) -> None:
    """Refuse a module converted otherwise than it was recorded: another type, or another
    ``batch_first`` (its inputs would be read along the wrong axes)."""
    noted = stored.recorded or {}
    where = argument("calibration", stored.source)
    kind = _kind(module)
    if noted.get("float_type") not in (None, kind):
        raise RefqError(
            f"{where}: {name} was recorded as a {shorten(noted['float_type'])}, but the "
            f"checkpoint's {name} is a {kind}; record the model this checkpoint is of"
        )
    batch_first = getattr(module, "batch_first", False)
    if isinstance(noted.get("batch_first"), bool) and noted["batch_first"] != batch_first:
        raise RefqError(
            f"{where}: {name} was recorded with batch_first={noted['batch_first']}, but is "
            f"converted with batch_first={batch_first}; set modules.{name}.batch_first: "
            f"{str(noted['batch_first']).lower()} in the spec"
        )


def _kind(module: nn.Module) -> str:
    for cls in (nn.RNN, nn.LSTM, nn.GRU, nn.RNNCell, nn.LSTMCell, nn.GRUCell):
        if isinstance(module, cls):
            return cls.__name__
    raise RefqError(f"{type(module).__name__} is no recurrent module refq calibrates")


def _shape(t: torch.Tensor) -> str:
    return str(tuple(t.shape))


def _canonical(module: nn.Module, stored: StoredCall, name: str, weight: torch.Tensor) -> Call:
    kind = _kind(module)
    lstm = kind in ("LSTM", "LSTMCell")
    where = argument("calibration", stored.source)

    def refuse(role: str, t: torch.Tensor, expected: str) -> RefqError:
        return RefqError(
            f"{where}: tensor {shorten(stored.key_of(role))} for {name} ({kind}) must be "
            f"{expected}, got shape {_shape(t)}"
        )

    def check_values(role: str, t: torch.Tensor) -> None:
        if not t.is_floating_point():
            raise RefqError(
                f"{where}: tensor {shorten(stored.key_of(role))} for {name} holds "
                f"{str(t.dtype).removeprefix('torch.')} values; store floating-point values"
            )
        if not bool(torch.isfinite(t).all()):
            raise RefqError(
                f"{where}: tensor {shorten(stored.key_of(role))} for {name} holds NaN or "
                "infinite values; store finite values"
            )
        if not bool(torch.isfinite(t.to(weight.dtype)).all()):  # what the module computes on
            dtype = str(weight.dtype).removeprefix("torch.")
            raise RefqError(
                f"{where}: tensor {shorten(stored.key_of(role))} for {name} holds values beyond "
                f"{dtype}'s range, the module's; store values it can hold"
            )

    x, h_0, c_0 = stored.input, stored.h_0, stored.c_0
    features = module.input_size
    if lstm and (h_0 is None) != (c_0 is None):
        missing = "c_0" if c_0 is None else "h_0"
        raise RefqError(
            f"{where}: {name} ({kind}) takes h_0 and c_0 together; add "
            f"{shorten(stored.key_of(missing))} or remove the other state"
        )
    if not lstm and c_0 is not None:
        raise RefqError(
            f"{where}: tensor {shorten(stored.key_of('c_0'))}: {name} is a {kind}, which takes "
            "no c_0; remove it"
        )
    cell = isinstance(module, nn.RNNCellBase)
    if cell:
        one_step = x.dim() == 2 and not stored.legacy
        if not (x.dim() == 3 or one_step) or x.shape[-1] != features or 0 in x.shape:
            expected = (
                f"a non-empty 3-D (time, batch, features) tensor with {features} features"
                if stored.legacy
                else f"a non-empty (batch, {features} features) tensor, or (steps, batch, "
                f"{features} features)"
            )
            raise refuse("input", x, expected)
        check_values("input", x)
        if one_step:
            x = x.unsqueeze(0)
        state_shape = (x.shape[1], module.hidden_size)
        state_words = f"(batch {x.shape[1]} as its input, hidden_size {module.hidden_size})"
        c_shape, c_words = state_shape, state_words
    else:
        batch_first = bool(module.batch_first)
        layout = "(batch, time, features)" if batch_first else "(time, batch, features)"
        if x.dim() != 3 or x.shape[-1] != features or 0 in x.shape:
            raise refuse("input", x, f"a non-empty 3-D {layout} tensor with {features} features")
        check_values("input", x)
        if batch_first:
            x = x.transpose(0, 1)
        stacks = module.num_layers * (2 if module.bidirectional else 1)
        proj = getattr(module, "proj_size", 0)
        batch = x.shape[1]
        state_shape = (stacks, batch, proj or module.hidden_size)
        size_name = "proj_size" if proj else "hidden_size"
        state_words = (
            f"(num_layers*directions {stacks}, batch {batch} as its input, "
            f"{size_name} {proj or module.hidden_size})"
        )
        c_shape = (stacks, batch, module.hidden_size)
        c_words = (
            f"(num_layers*directions {stacks}, batch {batch} as its input, hidden_size "
            f"{module.hidden_size})"
        )
    for role, t, shape, words in (
        ("h_0", h_0, state_shape, state_words),
        ("c_0", c_0, c_shape, c_words),
    ):
        if t is None:
            continue
        if tuple(t.shape) != shape:
            raise refuse(role, t, words)
        check_values(role, t)

    def placed(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        return t.to(device=weight.device, dtype=weight.dtype).contiguous()

    return Call(placed(x), placed(h_0), placed(c_0))  # type: ignore[arg-type]


# --- splitting ----------------------------------------------------------------------------------


def held_out_masks(calls: Sequence[Call], every: int = HELD_OUT_EVERY) -> list[torch.Tensor]:
    """Per call, which of its sequences are held out from fitting: those whose index ``i``,
    counted across ``calls`` in order, has ``i % every == every - 1``. Deterministic; with
    fewer than ``every`` sequences none is."""
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be a positive int, got {every!r}")
    masks, start = [], 0
    for call in calls:
        index = torch.arange(start, start + call.sequences)
        masks.append(index % every == every - 1)
        start += call.sequences
    return masks


def batched(
    calls: Sequence[Call], masks: Sequence[torch.Tensor] = ()
) -> tuple[list[Call], list[torch.Tensor]]:
    """Calls of the same length whose initial states are given alike, stacked along the batch
    into one call (in the order of their first call), with their sequences' ``masks`` (if
    any) stacked alike: a module then reads its weights once per step for all of them.
    Sequences do not interact, so each one's outputs are what its own call gives."""
    groups: dict[tuple[int, bool, bool], list[int]] = {}
    for i, call in enumerate(calls):
        groups.setdefault((call.input.shape[0], call.h_0 is None, call.c_0 is None), []).append(i)

    def stacked(tensors: list[torch.Tensor | None]) -> torch.Tensor | None:
        if tensors[0] is None:
            return None
        return torch.cat(tensors, dim=tensors[0].dim() - 2)  # type: ignore[arg-type]

    joined: list[Call] = []
    joined_masks: list[torch.Tensor] = []
    for members in groups.values():
        group = [calls[i] for i in members]
        joined.append(
            group[0]
            if len(group) == 1
            else Call(
                torch.cat([c.input for c in group], dim=1),
                stacked([c.h_0 for c in group]),
                stacked([c.c_0 for c in group]),
            )
        )
        if masks:
            joined_masks.append(torch.cat([masks[i] for i in members]))
    return joined, joined_masks


def select(call: Call, keep: torch.Tensor) -> Call:
    """The sequences of ``call`` that the boolean mask ``keep`` selects, with their states
    (the batch axis: the input's 1, a sequence module's states' 1, a cell's states' 0)."""
    index = keep.nonzero().flatten().to(call.input.device)

    def states(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.index_select(t.dim() - 2, index)

    return Call(call.input.index_select(1, index), states(call.h_0), states(call.c_0))


# --- writing ------------------------------------------------------------------------------------


def call_key(module: str, role: str, index: int) -> str:
    """The key of tensor ``role`` (input, h_0, c_0) of call ``index`` of ``module``."""
    return f"{module}/{role}/{index}"


def calibration_metadata(modules: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """The metadata of a calibration file recording ``modules`` (by name: float_type,
    batch_first, calls_seen, rows_seen, rows_kept)."""
    return {
        FORMAT_KEY: FORMAT,
        VERSION_KEY: VERSION,
        MODULES_KEY: strict_json(
            {k: dict(v) for k, v in modules.items()}, indent=None, sort_keys=True
        ),
    }


def stored_tensors(calls: Mapping[str, Sequence[StoredCall]]) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) of every tensor of ``calls``, in the order a file stores them: modules as
    given, each call's input, h_0, c_0, calls numbered in order."""
    for module, module_calls in calls.items():
        for index, call in enumerate(module_calls):
            for role, t in zip(ROLES, (call.input, call.h_0, call.c_0), strict=True):
                if t is not None:
                    yield call_key(module, role, index), t


def write_calibration_file(
    path: str | Path,
    calls: Mapping[str, Sequence[StoredCall]],
    *,
    modules: Mapping[str, Mapping[str, Any]] | None = None,
    force: bool = False,
    outputs: Outputs | None = None,
) -> None:
    """Write ``calls`` (by module name, tensors in the module's layout) as a calibration file
    at ``path``, with ``modules`` (see :func:`calibration_metadata`) as its metadata; through
    the run's ``outputs`` when given (its caller commits), else checked and moved into place
    here (an existing file refused without ``force``)."""
    metadata = calibration_metadata(modules or {})
    with SafetensorsWriter(Path(path), force=force, outputs=outputs) as writer:
        for key, tensor in stored_tensors(calls):
            writer.add(key, tensor)
        writer.finish(metadata)
