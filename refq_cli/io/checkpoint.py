"""Reading checkpoints: their tensors, and the recurrent modules in them (:mod:`.recurrent`).

Accepted inputs: a ``state_dict`` saved with ``torch.save`` (also nested under ``state_dict`` or
``model``), a ``.safetensors`` file, a TorchScript archive, and, only when trusted to run code
(``trust_code``), a pickled ``nn.Module``. Files are recognised by their bytes, not their names,
except a Hugging Face sharded checkpoint's index (``*.index.json``, :mod:`.sharded`): its
shards, each read as a single file is, make one checkpoint.
Unless trusted, ``torch.save`` files are read with ``weights_only=True`` and TorchScript archives
by refq's own reader (:mod:`refq_cli.io.torchscript`), so no code from the file runs. What a file
cannot hold as plain data or would cost far more than its size to read is refused.

Every tensor that is not a recurrent module's is carried through unchanged. ``strip_prefix``
takes a wrapper's prefix (``model.`` of PyTorch Lightning, ``module.`` of DDP) off the keys
before modules are found.
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

from refq_cli.errors import CheckpointError, argument, shorten
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
from refq_cli.io.sharded import (
    MAX_INDEX_BYTES,
    check_distinct,
    file_identity,
    index_of,
    is_index,
    parse_index,
)
from refq_cli.io.torchscript import is_torchscript, read_torchscript


@dataclass(frozen=True)
class Shard:
    """One file of a sharded checkpoint: its name in the index's folder, and its sha256."""

    name: str
    path: Path
    sha256: str


@dataclass
class Checkpoint:
    """Everything read from one input: a file, or an index and its shards (``shards``)."""

    path: Path
    format: str  # state_dict | safetensors | torchscript | pickle (an index: its shards')
    sha256: str  # of the file; of an index, of the index file itself
    tensors: dict[str, torch.Tensor]
    modules: dict[str, RecurrentModule] = field(default_factory=dict)
    shards: tuple[Shard, ...] = ()  # of an index, sorted by name
    _mapped: list[tuple[int, int]] | None = field(default=None, repr=False)
    _inputs: list[_OpenInput] = field(default_factory=list, repr=False)

    def check_has_modules(self) -> None:
        """CheckpointError when the file holds no recurrent module: nothing to convert."""
        if not self.modules:
            raise CheckpointError(
                f"{self.path}: no recurrent module found (looked for weight_ih/weight_hh keys)"
            )

    def check_unchanged(self) -> None:
        """CheckpointError if a file (the index or a shard) changed since refq began reading
        it: tensors mapped from it may then hold bytes its recorded sha256 does not cover."""
        for opened in self._inputs:
            opened.check_unchanged()

    @property
    def source(self) -> dict[str, Any]:
        """What the artifact's ``refq.source`` and the report record of the input: its name,
        sha256 and format, and for an index ``shards``, each shard's name and sha256."""
        found: dict[str, Any] = {"name": self.path.name, "sha256": self.sha256}
        found["format"] = self.format
        if self.shards:
            found["shards"] = [{"name": s.name, "sha256": s.sha256} for s in self.shards]
        return found

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
            files = [s.path for s in self.shards] if self.shards else [self.path]
            sizes = [f.stat().st_size for f in files]
            small = sum(sizes) < WORTH_RELEASING
            self._mapped = [] if small else [r for f in files for r in mapped_ranges(f)]
        for t in tensors:
            drop_pages(t, self._mapped)


def load_checkpoint(
    path: str | Path, *, trust_code: bool = False, strip_prefix: str | None = None
) -> Checkpoint:
    """Read ``path`` (a checkpoint file, or a sharded checkpoint's ``*.index.json``) and find
    its recurrent modules; CheckpointError for anything unreadable.

    ``strip_prefix`` (``"model."``; the trailing dot may be left out) is taken off every key
    that starts with it, and off the module paths the file records facts for, before modules
    are found; other keys are kept as they are."""
    path = Path(path)
    prefix = _prefix_of(strip_prefix)
    shards: tuple[Shard, ...] = ()
    if is_index(path):
        fmt, digest, tensors, facts, inputs, shards = _read_index(path, trust_code)
    else:
        index = index_of(path)
        if index is not None:  # a part of a checkpoint, which would convert as a model
            raise CheckpointError(
                f"{path}: is one shard of the sharded checkpoint {index}; give the index, which "
                "reads every shard as one checkpoint"
            )
        fmt, digest, tensors, facts, opened = _read(path, trust_code, "checkpoint")
        inputs = [opened]
    if prefix is not None:
        tensors, facts = _strip(path, prefix, tensors, facts)
    modules = find_recurrent_modules(tensors, str(path))
    for module_path, recorded in facts.items():
        if module_path in modules:
            modules[module_path] = with_recorded(modules[module_path], recorded, str(path))
    return Checkpoint(path, fmt, digest, tensors, modules, shards, _inputs=inputs)


def _prefix_of(strip_prefix: str | None) -> str | None:
    """``strip_prefix`` ending with its dot; CheckpointError for an empty one."""
    if strip_prefix is None:
        return None
    if not isinstance(strip_prefix, str) or not strip_prefix.strip("."):
        raise CheckpointError(
            f"{argument('strip_prefix', strip_prefix)}: give the prefix the checkpoint's keys "
            "start with, such as 'model.'"
        )
    return strip_prefix if strip_prefix.endswith(".") else strip_prefix + "."


_SHOWN_STARTS = 10


def _strip(
    path: Path, prefix: str, tensors: dict[str, torch.Tensor], facts: Facts
) -> tuple[dict[str, torch.Tensor], Facts]:
    """``tensors`` and ``facts`` with ``prefix`` taken off the keys and module paths that
    start with it; CheckpointError when none does, or two keys would become one."""
    named = f"{path}: strip_prefix {prefix!r}"  # the spec's key, --strip-prefix or strip_prefix=
    stripped: dict[str, torch.Tensor] = {}
    was: dict[str, str] = {}  # stripped key -> the key it was
    for key, tensor in tensors.items():
        new = key[len(prefix) :] if key.startswith(prefix) else key
        if not new:
            raise CheckpointError(f"{named}: key {shorten(key)} would become empty")
        if new in stripped:
            first, second = (was[new], key) if was[new] != new else (key, new)
            raise CheckpointError(
                f"{named}: keys {shorten(first)} and {shorten(second)} would both be "
                f"{shorten(new)}; the prefix cannot be taken off"
            )
        stripped[new] = tensor
        was[new] = key
    if all(was[k] == k for k in stripped):
        starts = list(
            dict.fromkeys(k.partition(".")[0] + ("." if "." in k else "") for k in tensors)
        )
        shown = ", ".join(starts[:_SHOWN_STARTS]) + (
            f" and {len(starts) - _SHOWN_STARTS} more" if len(starts) > _SHOWN_STARTS else ""
        )
        raise CheckpointError(f"{named}: no key starts with it; keys start with: {shown}")
    wrapper = prefix[:-1]  # the wrapper module itself, which may be a recurrent module
    moved = {
        "" if p == wrapper else p[len(prefix) :] if p.startswith(prefix) else p: recorded
        for p, recorded in facts.items()
    }
    return stripped, moved


def read_tensors(
    path: str | Path, *, trust_code: bool = False, what: str = "checkpoint"
) -> tuple[str, str, dict[str, torch.Tensor]]:
    """(format, sha256, name -> tensor) of a checkpoint (a sharded one's index among them) or
    a ``what`` file (calibration), which is one file."""
    path = Path(path)
    if is_index(path):
        if what != "checkpoint":
            raise CheckpointError(
                f"{path}: a sharded checkpoint's index; a {what} file is a single file"
            )
        fmt, digest, tensors, _, _, _ = _read_index(path, trust_code)
        return fmt, digest, tensors
    fmt, digest, tensors, _, _ = _read(path, trust_code, what)
    return fmt, digest, tensors


class _OpenInput:
    """An input file opened once: every later read goes through ``/proc/self/fd`` to this open
    file (where the system has it), so a path whose link or folder is swapped meanwhile cannot
    show refq other bytes than those it hashed, and a change to the file itself shows in its
    status. Closed when no longer referenced. ``where`` is how a message that it cannot be
    opened names it (``path`` unless given)."""

    def __init__(self, path: Path, what: str, where: str | None = None) -> None:
        try:
            self.fd = open_regular(path)
        except OSError as exc:
            raise CheckpointError(f"{where or path}: {why_unreadable(exc, what)}") from None
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
    path: Path, trust_code: bool, what: str, opened: _OpenInput | None = None
) -> tuple[str, str, dict[str, torch.Tensor], Facts, _OpenInput]:
    """What :func:`read_tensors` returns, the facts the file records about its modules, and
    the open file it was read from (``opened`` when given: ``path`` opened already). Messages
    name ``path``, never the file descriptor."""
    opened = opened or _OpenInput(path, what)
    try:
        fmt, digest, tensors, facts = _read_open(opened, trust_code, what)
    except CheckpointError as exc:
        raise CheckpointError(str(exc).replace(str(opened.source), str(path))) from None
    opened.check_unchanged()
    for key, tensor in tensors.items():
        _check_tensor(path, key, tensor, opened.before.st_size)
    return fmt, digest, tensors, facts, opened


def _read_index(
    path: Path, trust_code: bool
) -> tuple[str, str, dict[str, torch.Tensor], Facts, list[_OpenInput], tuple[Shard, ...]]:
    """The format, sha256 (of the index), tensors and facts of a sharded checkpoint, the open
    index and shards, and the shards. Each shard is read as :func:`_read` reads a single file;
    together they must hold exactly the tensors the weight_map places in each."""
    opened = _OpenInput(path, "checkpoint")
    index = parse_index(path, _read_fd(opened.fd, MAX_INDEX_BYTES))
    opened.check_unchanged()
    seen: dict[tuple[int, int], str | None] = {file_identity(opened.before): None}
    inputs = [opened]
    for name in index.shards:  # every shard opened, and told apart, before any is read
        shard = _OpenInput(index.shard_path(name), "shard", where=index.where(name))
        check_distinct(index, name, shard.before, seen)
        inputs.append(shard)
    formats: dict[str, str] = {}  # format -> the first shard of it
    found: dict[str, torch.Tensor] = {}
    facts: Facts = {}
    shards = []
    for name, shard in zip(index.shards, inputs[1:], strict=True):
        fmt, digest, tensors, recorded, _ = _read(shard.path, trust_code, "checkpoint", shard)
        formats.setdefault(fmt, name)
        if len(formats) > 1:
            (first, first_name), *_ = formats.items()
            raise CheckpointError(
                f"{index.where(name)} is {fmt}, but shard {shorten(first_name)} is {first}; "
                "the shards of one checkpoint share a format"
            )
        for key, tensor in tensors.items():
            owner = index.weight_map.get(key)
            if owner is None:
                raise CheckpointError(
                    f"{index.where(name)} holds tensor {shorten(key)}, which the weight_map "
                    "does not list; the index and its shards disagree"
                )
            if owner != name:
                twice = "; a tensor lies in one shard" if key in found else ""
                raise CheckpointError(
                    f"{index.where(name)} holds tensor {shorten(key)}, which the weight_map "
                    f"places in shard {shorten(owner)}{twice}; the index and its shards disagree"
                )
            found[key] = tensor
        for module_path, values in recorded.items():
            if facts.setdefault(module_path, values) != values:
                raise CheckpointError(
                    f"{index.where(name)} records other facts of module {shorten(module_path)} "
                    "than an earlier shard"
                )
        shards.append(Shard(name, shard.path, digest))
    for key, name in index.weight_map.items():
        if key not in found:
            raise CheckpointError(
                f"{path}: weight_map[{shorten(key)}] places tensor {shorten(key)} in shard "
                f"{shorten(name)}, which does not hold it"
            )
    opened.check_unchanged()
    return next(iter(formats)), index.sha256, found, facts, inputs, tuple(shards)


def _read_fd(fd: int, limit: int) -> bytes:
    """The bytes of open file ``fd`` from its start, or its first ``limit + 1`` when it holds
    more."""
    chunks, offset = [], 0
    while offset <= limit and (chunk := os.pread(fd, limit + 1 - offset, offset)):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


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

    # A safetensors file starts with its header's length (8 bytes, little-endian), then "{";
    # that length's low byte is 0x80 for one header size in 32, as a legacy pickle's first
    # byte is, so it is told first (a pickle's byte 8 is within torch's magic number).
    size = opened.before.st_size
    safetensors = (
        len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= size - 8
    )
    legacy = head[:1] == b"\x80" and not safetensors
    if head.startswith(b"PK\x03\x04"):
        _check_zip(path, size)
    elif legacy:
        with path.open("rb") as f:  # a legacy torch.save file: five pickles, then the data
            _check_numbers(path, count_huge_numbers(f, pickles=5))
    if head.startswith(b"PK\x03\x04") and is_torchscript(path):
        fmt, (tensors, facts) = "torchscript", _load_torchscript(path, trust_code)
    elif head.startswith(b"PK\x03\x04") or legacy:
        fmt, (tensors, facts) = _load_torch_save(path, trust_code, head.startswith(b"PK"))
    elif safetensors:
        fmt, tensors, facts = "safetensors", _load_safetensors(path), {}
        if _is_refq_artifact(path):
            raise CheckpointError(
                f"{path}: is already a refq artifact; convert the float checkpoint it came from"
            )
    else:
        named = "; a sharded checkpoint's index is read by its name, *.index.json"
        raise CheckpointError(
            f"{path}: not a checkpoint refq can read (expected a torch.save file, a "
            ".safetensors file or a TorchScript archive)" + (named if head[:1] == b"{" else "")
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
                f"a state_dict or .safetensors file needs no trust; pass {argument('trust_code')} "
                "only for a file you trust, since unpickling can run code"
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


# Where training code keeps the weights: Lightning's and most scripts' state_dict, model; the
# PyTorch tutorial's model_state_dict; DeepSpeed's module.
STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict", "module")


def _state_dict_of(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], Facts]:
    """The flat name -> tensor mapping inside whatever the file held, and the facts its
    recurrent modules record when it held a module."""
    if isinstance(obj, Mapping) and not _all_tensors(obj):
        for key in STATE_DICT_KEYS:
            inner = obj.get(key)
            if isinstance(inner, nn.Module) or (isinstance(inner, Mapping) and _all_tensors(inner)):
                obj = inner
                break
    facts = {}
    if isinstance(obj, nn.Module):
        facts = recorded_facts(obj)
        obj = obj.state_dict()
    if not isinstance(obj, Mapping) or not _all_tensors(obj) or not obj:
        keys = ", ".join(shorten(k) for k in list(obj)[:10]) if isinstance(obj, Mapping) else ""
        raise CheckpointError(
            f"{path}: holds no state_dict (a mapping of names to tensors, possibly under "
            + " or ".join(repr(k) for k in STATE_DICT_KEYS)
            + ")"
            + (f"; its keys: {keys}" if keys else "")
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
