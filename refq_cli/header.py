"""An artifact's header and small tensors, read without torch.

A safetensors file is an 8-byte little-endian header size, a JSON header of that size (tensor
name -> dtype, shape and byte range in the data that follows, plus ``__metadata__`` strings),
then the data. ``read_layout`` reads and checks the header and refuses malformed ones as the
safetensors library does (``tests/test_header.py`` holds the two side by side), so that a file
``refq inspect`` shows is one ``load_artifact`` reads; ``read_values`` reads one tensor's
numbers. ``refq inspect`` and the unchanged-artifact check of batch conversion use these and
so never import torch.
"""

from __future__ import annotations

import json
import math
import os
import reprlib
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from refq_cli.errors import ArtifactError

FORMAT = "refq"
FORMAT_VERSION = 1

# bytes per element of each dtype refq writes (artifact.py maps torch's dtypes to these names)
DTYPE_SIZES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
_STRUCT_CODES = {"F64": "d", "F32": "f", "F16": "e", "I64": "q", "I32": "i", "I16": "h"}
_STRUCT_CODES |= {"I8": "b", "U8": "B"}
_MAX_HEADER = 100_000_000  # the safetensors library's limit


@dataclass(frozen=True)
class TensorEntry:
    dtype: str
    shape: list[int]
    start: int  # absolute byte offsets in the file
    end: int


@dataclass(frozen=True)
class Layout:
    metadata: dict[str, str]
    tensors: dict[str, TensorEntry]  # in the order of their data


def read_layout(path: Path) -> Layout:
    """The checked header of the safetensors file at ``path``; ArtifactError names what is
    wrong with it."""
    try:
        with open(path, "rb", opener=_without_blocking) as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise ArtifactError(f"{path}: not a safetensors file: not a regular file")
            size_bytes = f.read(8)
            if len(size_bytes) < 8:
                raise ArtifactError(f"{path}: not a safetensors file: shorter than 8 bytes")
            header_size = int.from_bytes(size_bytes, "little")
            file_size = f.seek(0, 2)
            if header_size > min(_MAX_HEADER, file_size - 8):
                raise ArtifactError(
                    f"{path}: not a safetensors file: a header of {header_size} bytes in a "
                    f"file of {file_size}"
                )
            f.seek(8)
            text = f.read(header_size)
    except OSError as exc:
        raise ArtifactError(f"{path}: not a safetensors file: {exc.strerror or exc}") from None
    header = _json_object(path, text)
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ArtifactError(f"{path}: corrupt artifact: __metadata__ must map names to strings")
    data_start = 8 + header_size
    tensors = {name: _entry(path, name, entry, data_start) for name, entry in header.items()}
    ordered = sorted(tensors.items(), key=lambda item: (item[1].start, item[1].end))
    offset = data_start
    for name, t in ordered:  # the data is covered exactly, as the library demands
        if t.start != offset:
            raise ArtifactError(
                f"{path}: corrupt artifact: tensor {_short(name)} overlaps another or leaves a gap"
            )
        offset = t.end
    if offset != file_size:
        raise ArtifactError(
            f"{path}: corrupt or truncated artifact: its tensors end at byte {offset} of "
            f"{file_size}"
        )
    return Layout(metadata, dict(ordered))


def _without_blocking(path: str, flags: int) -> int:
    """Open without waiting: a FIFO with no writer would block ``open`` forever."""
    return os.open(path, flags | getattr(os, "O_NONBLOCK", 0))


def _json_object(path: Path, text: bytes) -> dict:
    """The header as JSON: strict UTF-8, no NaN or Infinity, strings that encode back."""

    def refuse(constant: str) -> None:
        raise ValueError(constant)

    try:
        header = json.loads(text.decode("utf-8"), parse_constant=refuse)
        json.dumps(header, ensure_ascii=False).encode("utf-8")  # lone surrogates (\ud800)
    except (UnicodeError, ValueError, RecursionError):  # JSONDecodeError is a ValueError
        raise ArtifactError(f"{path}: not a safetensors file: its header is not JSON") from None
    if not isinstance(header, dict):
        raise ArtifactError(f"{path}: not a safetensors file: its header is not a JSON object")
    return header


def _entry(path: Path, name: str, entry: object, data_start: int) -> TensorEntry:
    def bad(what: str) -> ArtifactError:
        return ArtifactError(f"{path}: corrupt artifact: tensor {_short(name)} {what}")

    if not isinstance(entry, dict):
        raise bad("has no dtype, shape and data_offsets")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise bad(f"has an unknown dtype {_short(dtype)}")
    if not isinstance(shape, list) or not all(type(d) is int and 0 <= d < 2**64 for d in shape):
        raise bad(f"has a malformed shape {_short(shape)}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1] < 2**64
    ):
        raise bad(f"has malformed data_offsets {_short(offsets)}")
    size = DTYPE_SIZES[dtype]
    for d in shape:  # step by step: a long shape of huge dimensions stops at once
        size *= d
        if size >= 2**64:
            raise bad(f"has a shape of more than 2**64 bytes: {_short(shape)}")
    if offsets[1] - offsets[0] != size:
        raise bad(f"holds {offsets[1] - offsets[0]} bytes, not those of a {dtype} {_short(shape)}")
    return TensorEntry(dtype, shape, data_start + offsets[0], data_start + offsets[1])


_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxother, _REPR.maxlist = 80, 80, 8


def _short(value: object) -> str:
    """``repr`` cut to a readable length: names and shapes come from untrusted files."""
    return _REPR.repr(value)


def read_values(path: Path, name: str, entry: TensorEntry) -> list[float] | list[int]:
    """The numbers of one tensor, flattened (meant for small ones: scales, zero points)."""
    code = _STRUCT_CODES.get(entry.dtype)
    if code is None:
        raise ArtifactError(
            f"{path}: tensor {_short(name)} is {entry.dtype}, not a number refq reads"
        )
    try:
        with open(path, "rb") as f:
            f.seek(entry.start)
            data = f.read(entry.end - entry.start)
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(data) != entry.end - entry.start:
        raise ArtifactError(
            f"{path}: corrupt or truncated artifact: tensor {_short(name)} is cut short"
        )
    return list(struct.unpack(f"<{math.prod(entry.shape)}{code}", data))


def read_artifact_layout(path: Path) -> Layout:
    """The checked header of a refq artifact of a format version this refq reads."""
    layout = read_layout(path)
    metadata = layout.metadata
    if metadata.get("format") != FORMAT:
        raise ArtifactError(
            f"{path}: a safetensors file, but not a refq artifact (no format: refq)"
        )
    version = metadata.get("refq.format_version", "")
    if not (version.isascii() and version.isdigit() and len(version) < 10):
        raise ArtifactError(f"{path}: artifact format version {_short(version)} is not a number")
    if int(version) > FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: artifact format version {version!r} is newer than this refq reads "
            f"({FORMAT_VERSION}); upgrade refq"
        )
    return layout


def read_header(path: Path) -> dict[str, str]:
    """The metadata of a refq artifact (see :func:`read_artifact_layout`)."""
    return read_artifact_layout(path).metadata
