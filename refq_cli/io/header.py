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
import stat
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from refq_cli.errors import ArtifactError, shorten
from refq_cli.io.inputs import why_unreadable
from refq_cli.kinds import (
    ARGUMENTS,
    DTYPE_NAMES,
    FLOAT_TYPES,
    KINDS,
    OBSERVER_NAMES,
    QSCHEME_NAMES,
    ROUNDING_NAMES,
    tensor_key,
    tensor_shapes,
)

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
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's limit; refq writes no larger header


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
            if header_size > min(MAX_HEADER_BYTES, file_size - 8):
                raise _checkpoint_error(path, size_bytes) or ArtifactError(
                    f"{path}: not a safetensors file: a header of {header_size} bytes in a "
                    f"file of {file_size}"
                )
            f.seek(8)
            text = f.read(header_size)
    except OSError as exc:
        raise ArtifactError(f"{path}: {why_unreadable(exc, 'artifact')}") from None
    try:
        header = _json_object(path, text)
    except ArtifactError as exc:
        raise _checkpoint_error(path, size_bytes) or exc from None
    if "__metadata__" in header.repeated:
        raise ArtifactError(f"{path}: not a safetensors file: its header has two __metadata__")
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
                f"{path}: corrupt artifact: tensor {shorten(name)} overlaps another or leaves a gap"
            )
        offset = t.end
    if offset != file_size:
        raise ArtifactError(
            f"{path}: corrupt or truncated artifact: its tensors end at byte {offset} of "
            f"{file_size}"
        )
    return Layout(metadata, dict(ordered))


def _checkpoint_kind(start: bytes) -> str | None:
    """What the first bytes of a file that is no safetensors file say it is, when they look
    like a PyTorch checkpoint: a zip (torch.save, torch.jit.save) or a pickle (the legacy
    torch.save format: the PROTO opcode, then the protocol)."""
    if start.startswith(b"PK\x03\x04"):
        return "a torch.save or TorchScript zip"
    if len(start) >= 2 and start[0] == 0x80 and 2 <= start[1] <= 5:
        return "a legacy torch.save pickle"
    return None


# how to make an artifact of a checkpoint, to end a message naming the checkpoint with
_CONVERT_HINT = (
    "make an artifact with `refq convert FILE --qconfig SPEC` (`refq init-config FILE` drafts "
    "a SPEC)"
)


def _checkpoint_error(path: Path, start: bytes) -> ArtifactError | None:
    """For a file with no safetensors header that starts with ``start``: the error saying it
    looks like a checkpoint and how to convert it, when it does; else None."""
    kind = _checkpoint_kind(start)
    if kind is None:
        return None
    return ArtifactError(
        f"{path}: not a refq artifact; it looks like a PyTorch checkpoint ({kind}); "
        + _CONVERT_HINT
    )


def _without_blocking(path: str, flags: int) -> int:
    """Open without waiting: a FIFO with no writer would block ``open`` forever."""
    return os.open(path, flags | getattr(os, "O_NONBLOCK", 0))


class _JsonObject(dict):
    """A JSON object that remembers the keys it was given more than once (the last one wins,
    as in ``json`` and in the safetensors library, which refuses some of them)."""

    repeated: frozenset[str] = frozenset()


def _json_object_of(pairs: list[tuple[str, Any]]) -> _JsonObject:
    obj = _JsonObject(pairs)
    if len(obj) < len(pairs):
        counts = Counter(k for k, _ in pairs)
        obj.repeated = frozenset(k for k, n in counts.items() if n > 1)
    return obj


def _refuse_constant(constant: str) -> None:
    raise ValueError(f"{constant} is not JSON")


def _json_object(path: Path, text: bytes) -> _JsonObject:
    """The header as JSON: strict UTF-8, no NaN or Infinity, strings that encode back."""
    try:
        header = json.loads(
            text.decode("utf-8"), parse_constant=_refuse_constant, object_pairs_hook=_json_object_of
        )
        json.dumps(header, ensure_ascii=False).encode("utf-8")  # lone surrogates (\ud800)
    except (UnicodeError, ValueError, RecursionError):  # JSONDecodeError is a ValueError
        raise ArtifactError(f"{path}: not a safetensors file: its header is not JSON") from None
    if not isinstance(header, _JsonObject):
        raise ArtifactError(f"{path}: not a safetensors file: its header is not a JSON object")
    return header


def _entry(path: Path, name: str, entry: object, data_start: int) -> TensorEntry:
    def bad(what: str) -> ArtifactError:
        return ArtifactError(f"{path}: corrupt artifact: tensor {shorten(name)} {what}")

    if not isinstance(entry, dict):
        raise bad("has no dtype, shape and data_offsets")
    twice = sorted(getattr(entry, "repeated", set()) & {"dtype", "shape", "data_offsets"})
    if twice:
        raise bad(f"gives {twice[0]} twice")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise bad(f"has an unknown dtype {shorten(dtype)}")
    if not isinstance(shape, list) or not all(type(d) is int and 0 <= d < 2**64 for d in shape):
        raise bad(f"has a malformed shape {shorten(shape)}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1] < 2**64
    ):
        raise bad(f"has malformed data_offsets {shorten(offsets)}")
    size = DTYPE_SIZES[dtype]
    for d in shape:  # step by step: a long shape of huge dimensions stops at once
        size *= d
        if size >= 2**64:
            raise bad(f"has a shape of more than 2**64 bytes: {shorten(shape)}")
    if offsets[1] - offsets[0] != size:
        raise bad(f"holds {offsets[1] - offsets[0]} bytes, not those of a {dtype} {shorten(shape)}")
    return TensorEntry(dtype, shape, data_start + offsets[0], data_start + offsets[1])


def read_values(path: Path, name: str, entry: TensorEntry) -> list[float] | list[int]:
    """The numbers of one tensor, flattened (meant for small ones: scales, zero points)."""
    code = _STRUCT_CODES.get(entry.dtype)
    if code is None:
        raise ArtifactError(
            f"{path}: tensor {shorten(name)} is {entry.dtype}, not a number refq reads"
        )
    try:
        with open(path, "rb") as f:
            f.seek(entry.start)
            data = f.read(entry.end - entry.start)
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(data) != entry.end - entry.start:
        raise ArtifactError(
            f"{path}: corrupt or truncated artifact: tensor {shorten(name)} is cut short"
        )
    return list(struct.unpack(f"<{math.prod(entry.shape)}{code}", data))


def open_data(path: Path) -> BinaryIO:
    """``path`` open for reading its tensors' bytes (with :func:`read_block`), without waiting
    on a FIFO; ArtifactError if it cannot be opened."""
    try:
        return open(path, "rb", opener=_without_blocking)
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot read: {exc.strerror or exc}") from None


def read_block(f: BinaryIO, path: Path, name: str, start: int, size: int) -> bytes:
    """``size`` bytes of tensor ``name`` from absolute offset ``start`` of the open file ``f``;
    ArtifactError if the file ends sooner (it changed since its header was read)."""
    try:
        f.seek(start)
        data = f.read(size)
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(data) != size:
        raise ArtifactError(
            f"{path}: corrupt or truncated artifact: tensor {shorten(name)} is cut short"
        )
    return data


_UNSIGNED = {1: "B", 2: "H", 4: "I", 8: "Q"}
_DECODE_CODES = _STRUCT_CODES | {"U16": "H", "U32": "I", "U64": "Q", "BOOL": "B"}


def element_bits(dtype: str, data: bytes) -> tuple[int, ...]:
    """Each element of ``data`` (of ``dtype``) as an unsigned integer of its bytes: equal bits,
    equal numbers (so NaN equals the same NaN, and -0.0 differs from 0.0)."""
    size = DTYPE_SIZES[dtype]
    return struct.unpack(f"<{len(data) // size}{_UNSIGNED[size]}", data)


def _float8_table(exponent_bits: int, bias: int, ieee_specials: bool) -> list[float]:
    mantissa_bits = 7 - exponent_bits
    table = []
    for byte in range(256):
        sign = -1.0 if byte & 0x80 else 1.0
        exponent, mantissa = (
            (byte >> mantissa_bits) & ((1 << exponent_bits) - 1),
            byte & ((1 << mantissa_bits) - 1),
        )
        top = exponent == (1 << exponent_bits) - 1
        if ieee_specials and top:  # E5M2: infinities and NaNs as in IEEE 754
            table.append(sign * math.inf if mantissa == 0 else math.nan)
        elif not ieee_specials and top and mantissa == (1 << mantissa_bits) - 1:  # E4M3fn: NaN
            table.append(math.nan)
        elif exponent == 0:
            table.append(sign * mantissa * 2.0 ** (1 - bias - mantissa_bits))
        else:
            table.append(sign * (1 + mantissa / (1 << mantissa_bits)) * 2.0 ** (exponent - bias))
    return table


_FLOAT8 = {"F8_E4M3": _float8_table(4, 7, False), "F8_E5M2": _float8_table(5, 15, True)}


def decode_values(dtype: str, data: bytes) -> list[float] | list[int]:
    """The numbers in ``data``, little-endian elements of any dtype :data:`DTYPE_SIZES` names
    (booleans as 0 and 1)."""
    if dtype in _FLOAT8:
        table = _FLOAT8[dtype]
        return [table[b] for b in data]
    if dtype == "BF16":  # the top half of a float32
        widened = bytearray(2 * len(data))
        widened[2::4], widened[3::4] = data[0::2], data[1::2]
        data, dtype = bytes(widened), "F32"
    return list(struct.unpack(f"<{len(data) // DTYPE_SIZES[dtype]}{_DECODE_CODES[dtype]}", data))


def read_artifact_layout(path: Path) -> Layout:
    """The checked header of a refq artifact of a format version this refq reads."""
    layout = read_layout(path)
    metadata = layout.metadata
    if metadata.get("format") != FORMAT:
        raise ArtifactError(
            f"{path}: a safetensors file, but not a refq artifact (no format: refq); "
            + _CONVERT_HINT
        )
    version = metadata.get("refq.format_version", "")
    if not (version.isascii() and version.isdigit() and len(version) < 10):
        raise ArtifactError(f"{path}: artifact format version {shorten(version)} is not a number")
    if int(version) > FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: artifact format version {version!r} is newer than this refq reads "
            f"({FORMAT_VERSION}); upgrade refq"
        )
    return layout


def read_header(path: Path) -> dict[str, str]:
    """The metadata of a refq artifact (see :func:`read_artifact_layout`)."""
    return read_artifact_layout(path).metadata


# --- the metadata of a refq artifact, checked before anything uses it ---------------------------

_JSON_KEYS = ("refq.modules", "refq.spec", "refq.source", "refq.producer")
_TEXT_FIELDS = {"refq.source": ("name", "format", "sha256"), "refq.producer": ("refq", "torch")}


def _is_int(value: Any) -> bool:
    return type(value) is int and -(2**63) <= value < 2**63


def _is_number(value: Any) -> bool:
    return _is_int(value) or (type(value) is float and math.isfinite(value))


# kind of value -> (test, what the message says it must be)
_KINDS = {
    "object": (lambda v: isinstance(v, dict), "a JSON object"),
    "text": (lambda v: isinstance(v, str), "text"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "int": (_is_int, "a 64-bit integer"),
    "count": (lambda v: _is_int(v) and v >= 0, "an integer of at least 0"),
    "size": (lambda v: _is_int(v) and v >= 1, "an integer of at least 1"),
    "axis": (lambda v: v is None or (_is_int(v) and v >= 0), "null or an integer of at least 0"),
    "fraction": (lambda v: _is_number(v) and 0 <= v <= 1, "a number from 0 to 1"),
    "sqnr": (lambda v: v is None or _is_number(v), "null or a finite number"),
}
CONFIG_KINDS: dict[str, dict[str, Any]] = {  # module type -> its constructor arguments' kinds
    name: {a: ARGUMENTS[a].check for a in kind.arguments} for name, kind in KINDS.items()
}
_REQUIRED = object()


def read_artifact(path: Path) -> tuple[Layout, dict[str, Any]]:
    """The checked header of a refq artifact and its checked metadata (:func:`check_metadata`)."""
    layout = read_artifact_layout(path)
    return layout, check_metadata(path, layout)


def check_metadata(path: Path, layout: Layout) -> dict[str, Any]:
    """The artifact's metadata with its JSON values parsed, every value of the type refq writes,
    and each module's config fitting the shapes of its tensors; ArtifactError says what does
    not. What passes can be shown, and rebuilt into modules no larger than the tensors."""
    metadata: dict[str, Any] = dict(layout.metadata)
    for key in _JSON_KEYS:
        if key not in metadata:
            raise ArtifactError(f"{path}: corrupt artifact: metadata {key} is missing")
        try:
            metadata[key] = json.loads(metadata[key], parse_constant=_refuse_constant)
        except (ValueError, RecursionError):
            raise ArtifactError(f"{path}: corrupt artifact: metadata {key} is not JSON") from None
        if _depth(metadata[key]) > _MAX_DEPTH:
            raise ArtifactError(
                f"{path}: corrupt artifact: metadata {key} nests deeper than {_MAX_DEPTH} levels"
            )
    check = _Checker(path)
    check.value(metadata["refq.spec"], "refq.spec", "object")
    for key, fields in _TEXT_FIELDS.items():
        check.value(metadata[key], key, "object")
        for name in fields:
            check.field(metadata[key], name, key, "text", default=None)
    check.shards(metadata["refq.source"])
    check.value(metadata["refq.modules"], "refq.modules", "object")
    for module_path, info in metadata["refq.modules"].items():
        check.module(module_path, info, layout.tensors)
    return metadata


_MAX_DEPTH = 32  # refq writes 5 levels; printing and JSON encoders recurse on deeper ones


def _depth(value: Any) -> int:
    """How deeply lists and objects nest in a parsed JSON value (without recursing)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            if depth <= _MAX_DEPTH:
                stack.extend(
                    (v, depth + 1) for v in (item.values() if isinstance(item, dict) else item)
                )
    return deepest


class _Checker:
    """Checks metadata values; errors name the file and the value's place in the metadata."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, message: str) -> ArtifactError:
        return ArtifactError(f"{self.path}: corrupt artifact: metadata {message}")

    def value(self, value: Any, where: str, kind: str | tuple[str, ...]) -> Any:
        if isinstance(kind, tuple):
            ok, wanted = isinstance(value, str) and value in kind, "one of " + ", ".join(kind)
        else:
            test, wanted = _KINDS[kind]
            ok = test(value)
        if not ok:
            raise self.fail(f"{where} must be {wanted}, got {shorten(value)}")
        return value

    def field(
        self, obj: dict, key: str, where: str, kind: str | tuple[str, ...], default: Any = _REQUIRED
    ) -> Any:
        if key not in obj:
            if default is _REQUIRED:
                raise self.fail(f"{where}.{key} is missing")
            return default
        return self.value(obj[key], f"{where}.{key}", kind)

    def shards(self, source: dict[str, Any]) -> None:
        """The optional ``shards`` of ``refq.source`` (a sharded checkpoint's): a list of one
        or more ``{"name", "sha256"}`` records, sorted by name."""
        if "shards" not in source:
            return
        records, where = source["shards"], "refq.source.shards"
        if not isinstance(records, list) or not records:
            raise self.fail(
                f"{where} must be a list of one or more {{name, sha256}} records, got "
                + shorten(records)
            )
        for n, record in enumerate(records):
            at = f"{where}[{n}]"
            self.value(record, at, "object")
            self.field(record, "name", at, "text")
            self.field(record, "sha256", at, "text")

    def module(self, module_path: str, info: Any, tensors: dict[str, TensorEntry]) -> None:
        where = f"refq.modules[{shorten(module_path)}]"
        self.value(info, where, "object")
        float_type = self.field(info, "float_type", where, tuple(KINDS))
        self.field(info, "float_dtype", where, FLOAT_TYPES)
        self.field(info, "is_decomposed", where, "bool")
        self.field(info, "reference_type", where, "text", default=None)
        config = self.field(info, "config", where, "object")
        kinds = CONFIG_KINDS[float_type]
        unknown = [k for k in config if k not in kinds]
        if unknown:
            raise self.fail(
                f"{where}.config has {shorten(unknown[0])}, which a {float_type} does not take "
                f"(it takes {', '.join(kinds)})"
            )
        for key, kind in kinds.items():
            required = ARGUMENTS[key].required
            self.field(config, key, f"{where}.config", kind, _REQUIRED if required else None)
        if config.get("proj_size", 0) >= config["hidden_size"]:
            raise self.fail(f"{where}.config.proj_size must be smaller than its hidden_size")
        per_layer = (2 + 2 * config.get("bias", True) + bool(config.get("proj_size", 0))) * (
            1 + config.get("bidirectional", False)
        )
        if config.get("num_layers", 1) * per_layer > len(tensors):  # before listing them
            raise self.fail(
                f"{where}.config.num_layers is {config['num_layers']}, but the artifact holds "
                f"{len(tensors)} tensors in all"
            )
        shapes = tensor_shapes(float_type, config)
        weights = self.weights(where, info, [n for n in shapes if n.startswith("weight")])
        for name, shape in shapes.items():
            key = tensor_key(module_path, name)
            self.tensor(tensors, key, shape, f"{where} ({float_type} {shorten(config)})")
            w = weights.get(name)
            if w is None or w["qscheme"] == "none":
                continue
            per_channel = w["qscheme"].startswith("per_channel")
            axis = w["axis"] or 0
            if per_channel and axis >= len(shape):
                raise self.fail(f"{where}.weights[{name!r}].axis {axis} is past its 2 dimensions")
            channels = shape[axis] if per_channel else 1
            if channels == 0:
                raise self.fail(f"{where}.weights[{name!r}] has no channels along axis {axis}")
            for suffix, dtype in (("_scale", "F32"), ("_zero_point", "I32")):
                needed_by = f"{where}.weights[{name!r}] ({w['qscheme']})"
                self.tensor(tensors, key + suffix, (channels,), needed_by, dtype)

    def weights(self, where: str, info: dict, names: list[str]) -> dict[str, dict[str, Any]]:
        weights = self.field(info, "weights", where, "object")
        if sorted(weights) != sorted(names):
            raise self.fail(
                f"{where}.weights names {shorten(sorted(weights))}, but its type and config have "
                f"weights {', '.join(names)}"
            )
        for name, w in weights.items():
            at = f"{where}.weights[{name!r}]"
            self.value(w, at, "object")
            if self.field(w, "qscheme", at, QSCHEME_NAMES) != "none":
                self.field(w, "spec_qscheme", at, QSCHEME_NAMES, default=None)
                self.field(w, "dtype", at, DTYPE_NAMES)
                self.field(w, "axis", at, "axis")
                self.field(w, "quant_min", at, "int")
                self.field(w, "quant_max", at, "int")
                self.field(w, "sqnr_db", at, "sqnr", default=None)
                self.field(w, "rounding", at, ROUNDING_NAMES, default=None)
            self.field(w, "observer", at, OBSERVER_NAMES, default=None)
        return weights

    def tensor(
        self,
        tensors: dict[str, TensorEntry],
        key: str,
        shape: tuple[int, ...],
        needed_by: str,
        dtype: str | None = None,
    ) -> None:
        """Tensor ``key`` must exist with ``shape`` (a 0-d one passes for ``(1,)``) and, given
        one, ``dtype``: the one refq writes."""
        entry = tensors.get(key)
        if entry is None:
            raise ArtifactError(
                f"{self.path}: corrupt artifact: tensor {shorten(key)} is missing; the metadata "
                f"of {needed_by} needs it"
            )
        if tuple(entry.shape) != shape and not (shape == (1,) and entry.shape == []):
            raise ArtifactError(
                f"{self.path}: corrupt artifact: tensor {shorten(key)} has shape "
                f"{shorten(tuple(entry.shape))}, but the metadata of {needed_by} needs {shape}"
            )
        if dtype is not None and entry.dtype != dtype:
            raise ArtifactError(
                f"{self.path}: corrupt artifact: tensor {shorten(key)} is {shorten(entry.dtype)}, "
                f"but refq stores it as {dtype}"
            )
