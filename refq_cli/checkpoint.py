"""Reading checkpoints and finding the recurrent modules in them.

Accepted inputs: a ``state_dict`` saved with ``torch.save`` (also nested under ``state_dict`` or
``model``), a ``.safetensors`` file, a TorchScript archive, and, only when trusted, a pickled
``nn.Module``. Files are recognised by their bytes, not their names. ``torch.save`` files are
always read with ``weights_only=True`` unless trust is given, so no code from the file runs.

Recurrent modules are found from key patterns and shapes: ``P.weight_ih`` / ``P.weight_hh`` is a
cell, ``P.weight_ih_l{k}[_reverse]`` a multi-layer module; the gate count (rows of ``weight_hh``
over the hidden size) tells RNN (1), GRU (3) and LSTM (4) apart, and ``weight_hr_l{k}`` means an
LSTM with ``proj_size``. Every other tensor is carried through unchanged.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import pickle
import re
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from refq_cli.digest import sha256_of
from refq_cli.errors import CheckpointError

_CELL_TYPES = {1: "RNNCell", 3: "GRUCell", 4: "LSTMCell"}
_SEQUENCE_TYPES = {1: "RNN", 3: "GRU", 4: "LSTM"}
_LAYER_KEY = re.compile(r"^(weight|bias)_(ih|hh|hr)_l(\d+)(_reverse)?$")
_CELL_KEYS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")


@dataclass(frozen=True)
class RecurrentModule:
    """A recurrent module found in a checkpoint: its float type and constructor config."""

    path: str
    float_type: str  # RNNCell | LSTMCell | GRUCell | RNN | LSTM | GRU
    config: dict[str, Any]
    tensor_names: tuple[str, ...]  # local names, in the float module's order

    @property
    def weight_names(self) -> list[str]:
        return [n for n in self.tensor_names if n.startswith("weight")]

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def describe(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.config.items())
        return f"{self.float_type}({args})"

    def build(self, tensors: Mapping[str, torch.Tensor], facts: Mapping[str, Any]) -> nn.Module:
        """The float module with ``tensors``' weights, constructed with the spec's ``facts``."""
        config = {**self.config, **facts}
        first = tensors[self.key(self.tensor_names[0])]
        module = getattr(nn, self.float_type)(**config, device="meta", dtype=first.dtype)
        local = {name: tensors[self.key(name)] for name in self.tensor_names}
        expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        actual = {k: tuple(v.shape) for k, v in local.items()}
        if expected != actual:
            diff = [
                f"{k}: expected {expected.get(k, 'nothing')}, got {actual.get(k, 'nothing')}"
                for k in sorted(set(expected) | set(actual))
                if expected.get(k) != actual.get(k)
            ]
            raise CheckpointError(
                f"{self.path or '<root>'}: weights do not fit {self.describe()}: " + "; ".join(diff)
            )
        module.load_state_dict(local, strict=True, assign=True)
        return module.train(False)


@dataclass
class Checkpoint:
    """Everything read from one input file."""

    path: Path
    format: str  # state_dict | safetensors | torchscript | pickle
    sha256: str
    tensors: dict[str, torch.Tensor]
    modules: dict[str, RecurrentModule] = field(default_factory=dict)
    _mapped: list[tuple[int, int]] | None = field(default=None, repr=False)

    @property
    def other_tensor_names(self) -> list[str]:
        owned = {m.key(n) for m in self.modules.values() for n in m.tensor_names}
        return [k for k in self.tensors if k not in owned]

    def release(self, tensors: Iterable[torch.Tensor]) -> None:
        """Give the memory pages of ``tensors`` back to the system once they have been used.

        Tensors mapped from the input file (``torch.save`` zip files, pickled modules among
        them, which refq maps, and safetensors files, which the safetensors library maps) stay
        valid: their pages are read from the file again if touched. Their pages otherwise stay
        resident, so a conversion that reads every tensor would hold the whole file in memory.
        Other tensors (TorchScript archives, legacy pre-zip ``torch.save`` files, or where the
        mapping cannot be found) are left alone.
        """
        if self._mapped is None:  # reading the process's memory map costs a millisecond or so
            small = self.path.stat().st_size < _WORTH_RELEASING
            self._mapped = [] if small else _mapped_ranges(self.path)
        for t in tensors:
            _drop_pages(t, self._mapped)


_MADV_DONTNEED = 4
_WORTH_RELEASING = 16 << 20  # bytes of checkpoint below which its pages are simply kept


def _mapped_ranges(path: Path) -> list[tuple[int, int]]:
    """Address ranges where this process maps ``path`` (Linux; elsewhere none are known)."""
    try:
        maps = Path("/proc/self/maps").read_text()
        inode = os.stat(path).st_ino
    except OSError:
        return []
    real = os.path.realpath(path)
    ranges = []
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[4] == str(inode) and fields[5] == real:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


def _drop_pages(t: torch.Tensor, mapped: list[tuple[int, int]]) -> None:
    """``madvise(MADV_DONTNEED)`` over the whole pages of ``t``'s storage inside the mapping:
    resident pages of a file mapping that was only read are dropped, to be read again if
    touched. Never applied to other memory, where it would zero the data."""
    if t.device.type != "cpu" or not mapped:
        return
    storage = t.untyped_storage()
    begin, size = storage.data_ptr(), storage.nbytes()
    page = mmap.PAGESIZE
    start, end = -(-begin // page) * page, (begin + size) // page * page
    if end > start and any(lo <= start and end <= hi for lo, hi in mapped):
        _libc().madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED)


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def load_checkpoint(path: str | Path, *, trust_pickle: bool = False) -> Checkpoint:
    """Read ``path`` and find its recurrent modules; CheckpointError for anything unreadable."""
    fmt, digest, tensors = read_tensors(path, trust_pickle=trust_pickle)
    path = Path(path)
    return Checkpoint(path, fmt, digest, tensors, find_recurrent_modules(tensors, str(path)))


def read_tensors(
    path: str | Path, *, trust_pickle: bool = False
) -> tuple[str, str, dict[str, torch.Tensor]]:
    """(format, sha256, name -> tensor) of a checkpoint or calibration file."""
    path = Path(path)
    name = str(path)
    if not path.exists():
        raise CheckpointError(f"{name}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{name}: is a directory, not a checkpoint")
    try:
        with path.open("rb") as f:
            head = f.read(16)
        digest = sha256_of(path)
    except OSError as exc:
        raise CheckpointError(f"{name}: cannot read: {exc.strerror or exc}") from None
    if not head:
        raise CheckpointError(f"{name}: the file is empty")

    if head.startswith(b"PK\x03\x04") and _is_torchscript(path):
        fmt, tensors = "torchscript", _load_torchscript(path)
    elif head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        fmt, tensors = _load_torch_save(path, trust_pickle, zip_format=head.startswith(b"PK"))
    elif len(head) >= 9 and head[8:9] == b"{":
        fmt, tensors = "safetensors", _load_safetensors(path)
        if _is_refq_artifact(path):
            raise CheckpointError(
                f"{name}: is already a refq artifact; convert the float checkpoint it came from"
            )
    else:
        raise CheckpointError(
            f"{name}: not a checkpoint refq can read (expected a torch.save file, a "
            ".safetensors file or a TorchScript archive)"
        )
    return fmt, digest, tensors


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return any(n.split("/", 1)[-1].startswith("code/") for n in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _load_torchscript(path: Path) -> dict[str, torch.Tensor]:
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # TorchScript raises many types for bad archives
        raise CheckpointError(
            f"{path}: cannot read the TorchScript archive: {_first_line(exc)}"
        ) from None
    return _state_dict_of(module, path)


def _load_torch_save(
    path: Path, trust_pickle: bool, zip_format: bool
) -> tuple[str, dict[str, torch.Tensor]]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zip_format)
        fmt = "state_dict"
    except pickle.UnpicklingError as exc:
        if "GLOBAL" not in str(exc):  # not a refusal: the pickle itself is broken
            raise CheckpointError(
                f"{path}: cannot read the checkpoint (truncated or corrupt?): {_first_line(exc)}"
            ) from None
        if not trust_pickle:
            raise CheckpointError(
                f"{path}: refused to unpickle Python objects ({_refused_globals(exc)}); "
                "a state_dict or .safetensors file needs no trust; pass --trust-pickle only "
                "for a file you trust, since unpickling can run code"
            ) from None
        obj = _load_trusted_pickle(path, zip_format)
        fmt = "pickle"
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read the checkpoint: {_first_line(exc)}") from None
    return fmt, _state_dict_of(obj, path)


def _load_trusted_pickle(path: Path, zip_format: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=zip_format)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read the checkpoint: {_first_line(exc)}") from None


def _refused_globals(exc: Exception) -> str:
    names = sorted(set(re.findall(r"GLOBAL ([\w.]+)", str(exc))))
    return "globals " + ", ".join(names) if names else _first_line(exc)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"{path}: not a valid .safetensors file: {_first_line(exc)}"
        ) from None


def _is_refq_artifact(path: Path) -> bool:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return (f.metadata() or {}).get("format") == "refq"


def _state_dict_of(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The flat name -> tensor mapping inside whatever the file held."""
    if isinstance(obj, (nn.Module, torch.jit.ScriptModule)):
        obj = obj.state_dict()
    if isinstance(obj, Mapping) and not _all_tensors(obj):
        for key in ("state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, nn.Module):
                inner = inner.state_dict()
            if isinstance(inner, Mapping) and _all_tensors(inner):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not _all_tensors(obj) or not obj:
        raise CheckpointError(
            f"{path}: holds no state_dict (a mapping of names to tensors, possibly under "
            "'state_dict' or 'model')"
        )
    return {str(k): v for k, v in obj.items()}


def _all_tensors(mapping: Mapping) -> bool:
    return all(isinstance(v, torch.Tensor) for v in mapping.values())


# --- finding recurrent modules ----------------------------------------------------------------


def find_recurrent_modules(
    tensors: Mapping[str, torch.Tensor], source: str = "checkpoint"
) -> dict[str, RecurrentModule]:
    """Recurrent modules by path, inferred from key patterns and shapes."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        prefix, _, local = key.rpartition(".")
        groups.setdefault(prefix, {})[local] = tensor
    found = {}
    for prefix, local in groups.items():
        is_cell = "weight_hh" in local or "weight_ih" in local
        is_sequence = any(_LAYER_KEY.match(k) for k in local)
        if is_cell and is_sequence:
            raise CheckpointError(
                f"{_where(prefix, source)}: holds both cell keys (weight_ih) and layer keys "
                "(weight_ih_l0); one module cannot be both"
            )
        if is_cell or is_sequence:
            module = (_cell if is_cell else _sequence)(prefix, local, source)
            for name in module.tensor_names:
                if not local[name].is_floating_point():
                    raise CheckpointError(
                        f"{_where(prefix, source)}: {name} has dtype "
                        f"{str(local[name].dtype).removeprefix('torch.')}; recurrent weights "
                        "must be floating point (is this file already quantized?)"
                    )
            found[prefix] = module
    return found


def _where(prefix: str, source: str) -> str:
    return f"{source}: {prefix or '<root>'}"


def _gates(prefix: str, weight_hh: torch.Tensor, hidden: int, source: str, key: str) -> int:
    if weight_hh.dim() != 2 or hidden == 0 or weight_hh.shape[0] % hidden:
        raise CheckpointError(
            f"{_where(prefix, source)}: {key} has shape {tuple(weight_hh.shape)}, which is no "
            "whole number of gates of the hidden size"
        )
    gates = weight_hh.shape[0] // hidden
    if gates not in _CELL_TYPES:
        raise CheckpointError(
            f"{_where(prefix, source)}: {key} has {gates} gates (shape "
            f"{tuple(weight_hh.shape)}); recurrent weights have 1 (RNN), 3 (GRU) or 4 (LSTM)"
        )
    return gates


def _cell(prefix: str, local: Mapping[str, torch.Tensor], source: str) -> RecurrentModule:
    missing = [k for k in ("weight_ih", "weight_hh") if k not in local]
    biases = [k for k in ("bias_ih", "bias_hh") if k in local]
    if missing or len(biases) == 1:
        absent = missing + [k for k in ("bias_ih", "bias_hh") if k not in local and biases]
        raise CheckpointError(
            f"{_where(prefix, source)}: looks like a recurrent cell but lacks "
            f"{', '.join(absent)} (has {', '.join(sorted(local))})"
        )
    weight_ih, weight_hh = local["weight_ih"], local["weight_hh"]
    if weight_ih.dim() != 2:
        raise CheckpointError(
            f"{_where(prefix, source)}: weight_ih must be 2-D, got shape {tuple(weight_ih.shape)}"
        )
    hidden = weight_hh.shape[1] if weight_hh.dim() == 2 else 0
    gates = _gates(prefix, weight_hh, hidden, source, "weight_hh")
    config = {"input_size": weight_ih.shape[1], "hidden_size": hidden, "bias": bool(biases)}
    names = tuple(k for k in _CELL_KEYS if k in local)
    return RecurrentModule(prefix, _CELL_TYPES[gates], config, names)


def _sequence(prefix: str, local: Mapping[str, torch.Tensor], source: str) -> RecurrentModule:
    layers = sorted({int(m.group(3)) for k in local if (m := _LAYER_KEY.match(k))})
    num_layers = layers[-1] + 1
    bidirectional = any(k.endswith("_reverse") for k in local if _LAYER_KEY.match(k))
    has_bias = "bias_ih_l0" in local
    has_proj = "weight_hr_l0" in local
    suffixes = ["", "_reverse"] if bidirectional else [""]
    expected = []
    for layer in range(num_layers):
        for suffix in suffixes:
            names = ["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if has_bias else [])
            names += ["weight_hr"] if has_proj else []
            expected += [f"{n}_l{layer}{suffix}" for n in names]
    present = {k for k in local if _LAYER_KEY.match(k)}
    if set(expected) != present:
        missing = sorted(set(expected) - present)
        extra = sorted(present - set(expected))
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + (
            [f"unexpected {', '.join(extra)}"] if extra else []
        )
        raise CheckpointError(
            f"{_where(prefix, source)}: inconsistent recurrent weights: {'; '.join(parts)}"
        )
    weight_ih, weight_hh = local["weight_ih_l0"], local["weight_hh_l0"]
    if weight_ih.dim() != 2 or weight_hh.dim() != 2:
        raise CheckpointError(
            f"{_where(prefix, source)}: weight_ih_l0 and weight_hh_l0 must be 2-D"
        )
    hidden = local["weight_hr_l0"].shape[1] if has_proj else weight_hh.shape[1]
    gates = _gates(prefix, weight_hh, hidden, source, "weight_hh_l0")
    if has_proj and gates != 4:
        raise CheckpointError(
            f"{_where(prefix, source)}: weight_hr (projections) belongs to an LSTM, but "
            f"weight_hh_l0 has {gates} gates"
        )
    config: dict[str, Any] = {
        "input_size": weight_ih.shape[1],
        "hidden_size": hidden,
        "num_layers": num_layers,
        "bias": has_bias,
        "bidirectional": bidirectional,
    }
    if has_proj:
        config["proj_size"] = weight_hh.shape[1]
    return RecurrentModule(prefix, _SEQUENCE_TYPES[gates], config, tuple(expected))
