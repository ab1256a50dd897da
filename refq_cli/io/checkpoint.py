"""Reading checkpoints: their tensors, and the recurrent modules in them (:mod:`.recurrent`).

Accepted inputs: a ``state_dict`` saved with ``torch.save`` (also nested under ``state_dict`` or
``model``), a ``.safetensors`` file, a TorchScript archive, and, only when trusted to run code
(``trust_code``), a pickled ``nn.Module``. Files are recognised by their bytes, not their names.
Unless trusted, ``torch.save`` files are read with ``weights_only=True`` and TorchScript archives
by refq's own reader (:mod:`refq_cli.io.torchscript`), so no code from the file runs. What a file
cannot hold as plain data or would cost far more than its size to read is refused.

Every tensor that is not a recurrent module's is carried through unchanged.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
import weakref
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from refq_cli.errors import CheckpointError, shorten
from refq_cli.io.digest import sha256_of
from refq_cli.io.inputs import open_regular, why_unreadable
from refq_cli.io.pages import WORTH_RELEASING, drop_pages, mapped_ranges
from refq_cli.io.pickles import MAX_HUGE_NUMBERS, count_huge_numbers
from refq_cli.io.recurrent import (
    Facts,
    RecurrentModule,
    find_recurrent_modules,
    recorded_facts,
    with_recorded,
)
from refq_cli.io.torchscript import is_torchscript, read_torchscript


@dataclass
class Checkpoint:
    """Everything read from one input file."""

    path: Path
    format: str  # state_dict | safetensors | torchscript | pickle
    sha256: str
    tensors: dict[str, torch.Tensor]
    modules: dict[str, RecurrentModule] = field(default_factory=dict)
    _mapped: list[tuple[int, int]] | None = field(default=None, repr=False)
    _input: _OpenInput | None = field(default=None, repr=False)

    def check_unchanged(self) -> None:
        """CheckpointError if the file changed since refq began reading it: tensors mapped
        from it may then hold bytes its recorded sha256 does not cover."""
        if self._input is not None:
            self._input.check_unchanged()

    @property
    def other_tensor_names(self) -> list[str]:
        owned = {m.key(n) for m in self.modules.values() for n in m.tensor_names}
        return [k for k in self.tensors if k not in owned]

    def release(self, tensors: Iterable[torch.Tensor]) -> None:
        """Give the memory pages of ``tensors`` back to the system once they have been used.

        Tensors mapped from the input file (``torch.save`` zip files, pickled modules among
        them, and TorchScript archives, which refq maps, and safetensors files, which the
        safetensors library maps) stay valid: their pages are read from the file again if
        touched. Their pages otherwise stay resident, so a conversion that reads every tensor
        would hold the whole file in memory. Other tensors (trusted TorchScript loaded by
        ``torch.jit.load``, legacy pre-zip ``torch.save`` files, or where the mapping cannot be
        found) are left alone.
        """
        if self._mapped is None:  # reading the process's memory map costs a millisecond or so
            small = self.path.stat().st_size < WORTH_RELEASING
            self._mapped = [] if small else mapped_ranges(self.path)
        for t in tensors:
            drop_pages(t, self._mapped)


def load_checkpoint(path: str | Path, *, trust_code: bool = False) -> Checkpoint:
    """Read ``path`` and find its recurrent modules; CheckpointError for anything unreadable."""
    path = Path(path)
    fmt, digest, tensors, facts, opened = _read(path, trust_code, "checkpoint")
    modules = find_recurrent_modules(tensors, str(path))
    for module_path, recorded in facts.items():
        if module_path in modules:
            modules[module_path] = with_recorded(modules[module_path], recorded, str(path))
    return Checkpoint(path, fmt, digest, tensors, modules, _input=opened)


def read_tensors(
    path: str | Path, *, trust_code: bool = False, what: str = "checkpoint"
) -> tuple[str, str, dict[str, torch.Tensor]]:
    """(format, sha256, name -> tensor) of a checkpoint or a ``what`` file (calibration)."""
    fmt, digest, tensors, _, _ = _read(Path(path), trust_code, what)
    return fmt, digest, tensors


class _OpenInput:
    """An input file opened once: every later read goes through ``/proc/self/fd`` to this open
    file (where the system has it), so a path whose link or folder is swapped meanwhile cannot
    show refq other bytes than those it hashed, and a change to the file itself shows in its
    status. Closed when no longer referenced."""

    def __init__(self, path: Path, what: str) -> None:
        try:
            self.fd = open_regular(path)
        except OSError as exc:
            raise CheckpointError(f"{path}: {why_unreadable(exc, what)}") from None
        weakref.finalize(self, os.close, self.fd)
        self.path = path
        self.before = os.fstat(self.fd)
        self.head = os.pread(self.fd, 16, 0)
        by_fd = Path(f"/proc/self/fd/{self.fd}")
        self.source = by_fd if by_fd.exists() else path  # what the readers open

    def check_unchanged(self) -> None:
        """Refuse a file that was rewritten or resized since it was opened: its sha256 and the
        tensors read from it would no longer belong together."""
        now = os.fstat(self.fd)
        if self.source == self.path:  # no /proc: the path may now name another file
            try:
                now = os.stat(self.path)
            except OSError as exc:
                raise CheckpointError(f"{self.path}: {why_unreadable(exc, 'checkpoint')}") from None
        if _identity(now) != _identity(self.before):
            raise CheckpointError(
                f"{self.path}: changed while refq read it; convert it again once nothing writes "
                "to it"
            )


def _read(
    path: Path, trust_code: bool, what: str
) -> tuple[str, str, dict[str, torch.Tensor], Facts, _OpenInput]:
    """What :func:`read_tensors` returns, the facts the file records about its modules, and
    the open file it was read from. Messages name ``path``, never the file descriptor."""
    opened = _OpenInput(path, what)
    try:
        fmt, digest, tensors, facts = _read_open(opened, trust_code, what)
    except CheckpointError as exc:
        raise CheckpointError(str(exc).replace(str(opened.source), str(path))) from None
    opened.check_unchanged()
    for key, tensor in tensors.items():
        _check_tensor(path, key, tensor, opened.before.st_size)
    return fmt, digest, tensors, facts, opened


def _read_open(
    opened: _OpenInput, trust_code: bool, what: str
) -> tuple[str, str, dict[str, torch.Tensor], Facts]:
    path, head = opened.source, opened.head
    try:
        digest = sha256_of(path)
    except OSError as exc:
        raise CheckpointError(f"{path}: {why_unreadable(exc, what)}") from None
    if not head:
        raise CheckpointError(f"{path}: the file is empty")

    if head.startswith(b"PK\x03\x04"):
        _check_zip(path, opened.before.st_size)
    elif head[:1] == b"\x80":
        with path.open("rb") as f:  # a legacy torch.save file: five pickles, then the data
            _check_numbers(path, count_huge_numbers(f, pickles=5))
    if head.startswith(b"PK\x03\x04") and is_torchscript(path):
        fmt, (tensors, facts) = "torchscript", _load_torchscript(path, trust_code)
    elif head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        fmt, (tensors, facts) = _load_torch_save(path, trust_code, head.startswith(b"PK"))
    elif len(head) >= 9 and head[8:9] == b"{":
        fmt, tensors, facts = "safetensors", _load_safetensors(path), {}
        if _is_refq_artifact(path):
            raise CheckpointError(
                f"{path}: is already a refq artifact; convert the float checkpoint it came from"
            )
    else:
        raise CheckpointError(
            f"{path}: not a checkpoint refq can read (expected a torch.save file, a "
            ".safetensors file or a TorchScript archive)"
        )
    return fmt, digest, tensors, facts


def _check_numbers(path: Path, huge: int) -> None:
    if huge > MAX_HUGE_NUMBERS:
        raise CheckpointError(
            f"{path}: its pickle holds over {MAX_HUGE_NUMBERS} numbers of 2**60 or more, as a "
            "hash-collision flood does (minutes to unpickle); refq refuses it"
        )


def _identity(status: os.stat_result) -> tuple[int, ...]:
    return (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns)


_MAX_ZIP_ENTRIES = 1_000_000


def _check_zip(path: Path, size: int) -> None:
    """Refuse zip files that torch would inflate: ``torch.save`` and TorchScript store their
    pickles and tensor data uncompressed (TorchScript compresses only its ``code/`` folder),
    so a compressed entry elsewhere can only make a small file cost gigabytes."""
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
            if len(entries) > _MAX_ZIP_ENTRIES:
                raise CheckpointError(f"{path}: a zip of {len(entries)} entries is no checkpoint")
            with path.open("rb") as f:
                for info in entries:
                    f.seek(info.header_offset)
                    local = f.read(30)
                    local_method = int.from_bytes(local[8:10], "little") if len(local) == 30 else -1
                    stored = info.compress_type == zipfile.ZIP_STORED and local_method == 0
                    if not stored and "/code/" not in f"/{info.filename}":
                        raise CheckpointError(
                            f"{path}: zip entry {info.filename!r} is compressed; torch "
                            "never compresses it, so refq refuses it (re-save the checkpoint)"
                        )
                    if (stored and info.file_size > size) or info.header_offset > size:
                        raise CheckpointError(
                            f"{path}: zip entry {info.filename!r} claims {info.file_size} bytes "
                            f"in a file of {size}; the file is corrupt"
                        )
            for info in entries:  # TorchScript's code/ holds debug pickles nobody reads here
                if info.filename.endswith(".pkl") and "/code/" not in f"/{info.filename}":
                    with archive.open(info) as stream:
                        _check_numbers(path, count_huge_numbers(stream))
    except CheckpointError:
        raise
    except Exception as exc:  # zipfile raises many types for crafted directories
        raise CheckpointError(
            f"{path}: cannot read the checkpoint: not a valid zip file ({_first_line(exc)})"
        ) from None


def _check_tensor(path: Path, key: str, t: torch.Tensor, file_size: int) -> None:
    """Refuse tensors refq cannot read as plain data, or that claim more than the file holds."""
    where = f"{path}: tensor {key!r}"
    if t.is_nested:
        raise CheckpointError(f"{where} is a nested tensor; save plain tensors")
    if t.layout != torch.strided:
        raise CheckpointError(
            f"{where} has layout {str(t.layout).removeprefix('torch.')}; save it dense "
            "(.to_dense())"
        )
    if t.device.type != "cpu":
        raise CheckpointError(
            f"{where} is on device {t.device.type}, which holds no data refq can read"
        )
    if t.is_quantized:
        raise CheckpointError(f"{where} is already quantized; give a float checkpoint")
    nbytes = t.untyped_storage().nbytes()
    if nbytes > file_size:
        raise CheckpointError(
            f"{where} claims {nbytes} bytes of storage in a file of {file_size}; the file is "
            "corrupt"
        )
    if _overlaps(t):
        raise CheckpointError(
            f"{where} is a view whose elements overlap (shape {tuple(t.shape)}, stride "
            f"{t.stride()}, as from expand()); save it with .contiguous()"
        )


def _overlaps(t: torch.Tensor) -> bool:
    """Whether two indices of ``t`` may share memory: with its dimensions sorted by stride,
    each stride must step past everything the smaller ones reach."""
    if t.numel() == 0:
        return False
    reach = 0
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride(), strict=True) if s > 1):
        if stride <= reach:
            return True
        reach += (size - 1) * stride
    return False


def _load_torchscript(path: Path, trust_code: bool) -> tuple[dict[str, torch.Tensor], Facts]:
    """The archive's state_dict and recorded facts: read by refq without running any of its
    code, or, when trusted, loaded by ``torch.jit.load``, which runs it."""
    if not trust_code:
        contents = read_torchscript(path)
        tensors, _ = _state_dict_of(contents.tensors, path)
        return tensors, contents.facts
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # TorchScript raises many types for bad archives
        raise CheckpointError(
            f"{path}: cannot read the TorchScript archive: {_first_line(exc)}"
        ) from None
    return _state_dict_of(module, path)


def _load_torch_save(
    path: Path, trust_code: bool, zip_format: bool
) -> tuple[str, tuple[dict[str, torch.Tensor], Facts]]:
    try:
        with warnings.catch_warnings():  # torch's deprecation notes about the file's contents
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zip_format)
        fmt = "state_dict"
    except pickle.UnpicklingError as exc:
        if "GLOBAL" not in str(exc):  # not a refusal: the pickle itself is broken
            raise CheckpointError(
                f"{path}: cannot read the checkpoint (truncated or corrupt?): {_first_line(exc)}"
            ) from None
        if not trust_code:
            raise CheckpointError(
                f"{path}: refused to unpickle Python objects ({_refused_globals(exc)}); "
                "a state_dict or .safetensors file needs no trust; pass --trust-code only "
                "for a file you trust, since unpickling can run code"
            ) from None
        obj = _load_trusted_pickle(path, zip_format)
        fmt = "pickle"
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read the checkpoint: {_first_line(exc)}") from None
    return fmt, _state_dict_of(obj, path)


def _load_trusted_pickle(path: Path, zip_format: bool) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
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


def _state_dict_of(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], Facts]:
    """The flat name -> tensor mapping inside whatever the file held, and the facts its
    recurrent modules record when it held a module."""
    if isinstance(obj, Mapping) and not _all_tensors(obj):
        for key in ("state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, nn.Module) or (isinstance(inner, Mapping) and _all_tensors(inner)):
                obj = inner
                break
    facts = {}
    if isinstance(obj, nn.Module):
        facts = recorded_facts(obj)
        obj = obj.state_dict()
    if not isinstance(obj, Mapping) or not _all_tensors(obj) or not obj:
        raise CheckpointError(
            f"{path}: holds no state_dict (a mapping of names to tensors, possibly under "
            "'state_dict' or 'model')"
        )
    for key in obj:
        if not isinstance(key, str):
            raise CheckpointError(
                f"{path}: key {shorten(key)} is of type {type(key).__name__}, not a string; "
                "state_dict keys are names"
            )
        if not key.isascii():
            try:
                key.encode("utf-8")
            except UnicodeEncodeError:
                raise CheckpointError(
                    f"{path}: key {shorten(key)} is not valid Unicode (a lone surrogate)"
                ) from None
    return dict(obj), facts


def _all_tensors(mapping: Mapping) -> bool:
    return all(isinstance(v, torch.Tensor) for v in mapping.values())
