"""Hugging Face sharded checkpoints: an index file and the shards it names, read as one input.

An index (``model.safetensors.index.json``, ``pytorch_model.bin.index.json``; any name ending
in ``.index.json``) is UTF-8 JSON: ``{"metadata": {...}, "weight_map": {tensor: shard}}``. Each
shard is a file NAME in the index's folder (a link there may point anywhere, as in the Hugging
Face cache), never a path, another index or the index itself, and no file is two shards.
:mod:`refq_cli.io.checkpoint` reads every shard as it reads a single checkpoint, then checks
that the shards hold exactly the tensors the map places in them.

Shards are read and listed sorted by name (``model-00001-of-00003.safetensors`` first), whatever
the order of the weight_map, and the tensors keep the order of the shards and, in each, of the
file. Plain Python: importing this does not import torch (``--skip-unchanged`` and batch
planning use it).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refq_cli.errors import CheckpointError, shorten
from refq_cli.io.inputs import NotRegularFile, read_at_most, why_unreadable

INDEX_SUFFIX = ".index.json"
MAX_INDEX_BYTES = 64 << 20  # Hugging Face's indexes of the largest models are a few MB
MAX_SHARDS = 10_000  # each shard stays open while the checkpoint is used
# Parsed, JSON costs up to 40 times its size in objects (``[{}, {}, ...]``), so what an index
# holds is bounded before it is parsed, by counting bytes (an upper bound, as strings may hold
# them too): a few objects and lists, and names (a weight_map entry takes 4 quotes; 64 MiB of
# real tensor names hold fewer than a million).
MAX_CONTAINERS = 10_000
MAX_NAMES = 1_000_000


def is_index(path: str | Path) -> bool:
    """Whether ``path`` names a sharded checkpoint's index (its name ends with ``.index.json``)."""
    return Path(path).name.endswith(INDEX_SUFFIX)


@dataclass(frozen=True)
class Index:
    """A checked index: which shard holds each tensor, and the shards in order."""

    path: Path
    sha256: str  # of the bytes parsed
    weight_map: dict[str, str]  # tensor name -> shard name, in the file's order
    first_keys: dict[str, str]  # shard name -> the first tensor the weight_map places in it

    @property
    def shards(self) -> list[str]:
        """The shard names, sorted."""
        return sorted(self.first_keys)

    def shard_path(self, name: str) -> Path:
        return self.path.parent / name

    def where(self, name: str) -> str:
        """How a message names shard ``name``: the index, the first key naming it, the shard."""
        return f"{self.path}: weight_map[{shorten(self.first_keys[name])}]: shard {shorten(name)}"


class _Pairs(dict):
    """A JSON object that remembers the keys it was given more than once."""

    repeated: frozenset[str] = frozenset()


def _pairs(pairs: list[tuple[str, Any]]) -> _Pairs:
    obj = _Pairs(pairs)
    if len(obj) < len(pairs):
        obj.repeated = frozenset(k for k, n in Counter(k for k, _ in pairs).items() if n > 1)
    return obj


def _refuse_constant(constant: str) -> None:
    raise ValueError(f"{constant} is not JSON")


def _encodes(text: str) -> bool:
    """Whether ``text`` is valid Unicode (no lone surrogate, which JSON's ``\\ud800`` gives)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_file_name(name: str) -> bool:
    return (
        name not in ("", ".", "..")
        and name.isprintable()  # no control character or line break to reach a message
        and not any(c in name for c in ("/", "\\", "\0"))  # os.sep and os.altsep among them
    )


def parse_index(path: Path, data: bytes) -> Index:
    """The checked index held in ``data``, the bytes of the file at ``path`` (at most
    ``MAX_INDEX_BYTES + 1`` of them); CheckpointError, naming ``path`` and the key, for any
    index refq does not read."""

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: {what}")

    if len(data) > MAX_INDEX_BYTES:
        raise bad(
            f"an index of over {MAX_INDEX_BYTES >> 20} MiB is no checkpoint index; refq refuses it"
        )
    containers = data.count(b"{") + data.count(b"[")
    if containers > MAX_CONTAINERS:
        raise bad(
            f"holds {containers} JSON objects or lists; a checkpoint index holds a few, and "
            f"refq reads at most {MAX_CONTAINERS}"
        )
    if data.count(b'"') > 4 * MAX_NAMES + 1000:
        raise bad(f"holds over {MAX_NAMES} names; refq reads indexes of at most that many tensors")
    try:
        top = json.loads(
            data.decode("utf-8"), parse_constant=_refuse_constant, object_pairs_hook=_pairs
        )
    except RecursionError:
        raise bad("not a checkpoint index: its JSON nests too deeply") from None
    except (UnicodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise bad(f"not a checkpoint index: not UTF-8 JSON ({exc})") from None
    if not isinstance(top, dict):
        raise bad(
            'not a checkpoint index: expected a JSON object {"metadata": ..., "weight_map": ...}'
        )
    if top.repeated:
        raise bad(f"not a checkpoint index: key {shorten(min(top.repeated))} is given twice")
    if not isinstance(top.get("metadata", {}), dict):
        raise bad("metadata must be a JSON object")
    weight_map = top.get("weight_map")
    if weight_map is None:
        raise bad("not a checkpoint index: it has no weight_map (tensor name -> shard file)")
    if not isinstance(weight_map, dict):
        raise bad(
            "weight_map must be a JSON object of tensor name -> shard file, got "
            + _kind(weight_map)
        )
    if weight_map.repeated:
        key = min(weight_map.repeated)
        raise bad(f"weight_map[{shorten(key)}] is given twice: a tensor lies in one shard")
    if not weight_map:
        raise bad("weight_map is empty: the index names no shard")
    shards: dict[str, str] = {}  # name -> first key
    for key, name in weight_map.items():
        where = f"weight_map[{shorten(key)}]"
        if not (key.isascii() or _encodes(key)):
            raise bad(f"{where}: the tensor name is not valid Unicode (a lone surrogate)")
        if not isinstance(name, str):
            raise bad(f"{where} must be a shard's file name, got {_kind(name)}")
        if name in shards:
            continue
        if not (name.isascii() or _encodes(name)):
            raise bad(f"{where}: the shard name is not valid Unicode (a lone surrogate)")
        if not _is_file_name(name):
            raise bad(
                f"{where}: shard {shorten(name)} is not a file name; shards are files in the "
                "index's folder, named without a path"
            )
        if name == path.name:
            raise bad(f"{where}: shard {shorten(name)} is this index itself")
        if is_index(name):
            raise bad(f"{where}: shard {shorten(name)} is an index, not a shard")
        shards[name] = key
        if len(shards) > MAX_SHARDS:
            raise bad(f"weight_map names over {MAX_SHARDS} shards; refq refuses it")
    return Index(path, hashlib.sha256(data).hexdigest(), weight_map, shards)


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "text", bool: "a boolean"}
    if value is None:
        return "null"
    return names.get(type(value), "a number")


def read_index(path: str | Path) -> Index:
    """The checked index at ``path``, read within :data:`MAX_INDEX_BYTES`."""
    path = Path(path)
    try:
        data = read_at_most(path, MAX_INDEX_BYTES)
    except OSError as exc:
        raise CheckpointError(f"{path}: {why_unreadable(exc, 'checkpoint')}") from None
    return parse_index(path, data)


MAX_SIBLING_INDEXES = 16  # indexes beside a file that are read to tell whether it is a shard


def index_of(path: Path) -> Path | None:
    """The index beside ``path`` that lists it as a shard, if any (the first, by name, of at
    most :data:`MAX_SIBLING_INDEXES`); indexes that cannot be read are passed over."""
    try:
        siblings = sorted(p for p in path.parent.iterdir() if is_index(p) and p != path)
    except OSError:
        return None
    for candidate in siblings[:MAX_SIBLING_INDEXES]:
        try:
            if path.name in read_index(candidate).first_keys:
                return candidate
        except CheckpointError:
            continue
    return None


def file_identity(status: os.stat_result) -> tuple[int, int]:
    """What tells one file from another, whatever names or links lead to it."""
    return (status.st_dev, status.st_ino)


def check_distinct(
    index: Index, name: str, status: os.stat_result, seen: dict[tuple[int, int], str | None]
) -> None:
    """Refuse shard ``name`` (of ``status``) when it is a file met before: the index itself
    (``seen`` maps its identity to None) or another shard, through a link. Records it."""
    earlier = seen.get(file_identity(status), "")
    if earlier is None:
        raise CheckpointError(f"{index.where(name)} is the index itself (a link to it)")
    if earlier:
        raise CheckpointError(
            f"{index.where(name)} is the same file as shard {shorten(earlier)} (a link); "
            "each shard is a file of its own"
        )
    seen[file_identity(status)] = name


def shard_status(index: Index, name: str) -> os.stat_result:
    """The status of shard ``name`` (links followed); CheckpointError naming the index and
    the key when it is missing or no regular file."""
    path = index.shard_path(name)
    try:
        status = os.stat(path)
        if stat.S_ISDIR(status.st_mode):
            raise IsADirectoryError(path)
        if not stat.S_ISREG(status.st_mode):
            raise NotRegularFile(path)
    except OSError as exc:
        raise CheckpointError(f"{index.where(name)}: {why_unreadable(exc, 'shard')}") from None
    return status


def read_checked(path: str | Path) -> Index:
    """The checked index at ``path``, whose shards are regular files, none of them the index
    or another shard (through links); CheckpointError otherwise."""
    path = Path(path)
    index = read_index(path)
    try:
        seen: dict[tuple[int, int], str | None] = {file_identity(os.stat(path)): None}
    except OSError as exc:
        raise CheckpointError(f"{path}: {why_unreadable(exc, 'checkpoint')}") from None
    for name in index.shards:
        check_distinct(index, name, shard_status(index, name), seen)
    return index
