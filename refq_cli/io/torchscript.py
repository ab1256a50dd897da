"""Reading TorchScript archives without running any of their code.

``torch.jit.load`` compiles the archive's code and runs it (a scripted module's ``__setstate__``
can write files or print), so refq reads the archive itself instead: the zip directory, the
pickled module tree in ``<prefix>/data.pkl`` (with an unpickler that knows only tensor rebuilds,
storages and inert placeholders for the archive's own classes), the tensor bytes (mapped, not
copied) and the class declarations in ``<prefix>/code/``, parsed as text and never executed.
"""

from __future__ import annotations

import ast
import io
import itertools
import mmap
import os
import pickle
import re
import stat
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from refq_cli.errors import CheckpointError
from refq_cli.io.inputs import NotRegularFile, open_regular
from refq_cli.kinds import ARGUMENTS, KINDS, display_path, kind_with

_MAX_PICKLE = 32 << 20  # bytes of data.pkl: torch writes about 100 bytes per tensor
_MAX_CODE_FILE = 16 << 20  # bytes of one code file, uncompressed
_MAX_CODE = 64 << 20  # bytes of all code files together
_MAX_ENTRIES = 1 << 20
_MAX_DEPTH = 100  # nesting of submodules
_MAX_VISITS = 1_000_000  # modules and attributes visited (a module may be shared many times)
_MAX_TENSORS = 1_000_000  # state_dict entries

_RECORDED = {*ARGUMENTS, "mode"}
_MODES = {"LSTM": "LSTM", "GRU": "GRU", "RNN_TANH": "RNN", "RNN_RELU": "RNN"}
_MANGLE = re.compile(r"\.___torch_mangle_\d+")

_DTYPES = {
    "Float": torch.float32,
    "Double": torch.float64,
    "Half": torch.float16,
    "BFloat16": torch.bfloat16,
    "Long": torch.int64,
    "Int": torch.int32,
    "Short": torch.int16,
    "Char": torch.int8,
    "Byte": torch.uint8,
    "Bool": torch.bool,
    "ComplexFloat": torch.complex64,
    "ComplexDouble": torch.complex128,
    "Float8_e4m3fn": torch.float8_e4m3fn,
    "Float8_e5m2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class TorchScriptContents:
    """What a TorchScript archive holds, read without running it.

    ``tensors``: the module's state_dict (parameters and buffers by dotted name, in the order
    ``torch.jit.load(path).state_dict()`` gives), mapped from the file copy-on-write.
    ``facts``: for each recurrent submodule (``""`` for the root) whose archive records its
    constructor arguments, those arguments (``hidden_size``, ``batch_first``, ...) as plain
    Python values; only the ones recorded.
    """

    tensors: dict[str, torch.Tensor]
    facts: dict[str, dict[str, Any]]


def is_torchscript(path: str | Path) -> bool:
    """Whether ``path`` is a zip file with a TorchScript ``<prefix>/code/`` folder."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
        with zipfile.ZipFile(path) as archive:
            return any(n.split("/", 1)[-1].startswith("code/") for n in archive.namelist())
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return False


def read_torchscript(path: Path) -> TorchScriptContents:
    """The state_dict and recurrent-module facts of the TorchScript archive at ``path``.

    Runs nothing from the archive. Raises CheckpointError, with one line naming the file, for
    anything malformed or refused.
    """
    try:
        return _Reader(Path(path)).read()
    except _Refused as exc:
        what = " ".join(str(exc).split())
        raise CheckpointError(f"{path}: not a readable TorchScript archive: {what}") from None
    except CheckpointError:
        raise
    except (Exception, RecursionError, MemoryError) as exc:  # a bug or an OS error: one line
        raise CheckpointError(f"{path}: not a readable TorchScript archive: {_line(exc)}") from None


class _Refused(Exception):
    """What is wrong with the archive, as one line."""


def _line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}"[:300] if text else type(exc).__name__


def _show(value: object) -> str:
    """``value`` as one short printable line, for messages naming what an archive holds."""
    if isinstance(value, type) and issubclass(value, _Placeholder):
        return f"class {ascii(value.qualname)[:120]}"
    if isinstance(value, tuple) and not all(type(v) is int for v in value):
        return f"({', '.join(_show(v) for v in value[:6])}{', ...' if len(value) > 6 else ''})"
    if value is None or isinstance(value, (str, bytes, int, float)):
        return ascii(value)[:120]
    return f"a {type(value).__name__}"


@dataclass(frozen=True)
class _Entry:
    name: str
    compressed: bool
    start: int  # offset of the entry's data in the file
    size: int  # stored bytes
    info: zipfile.ZipInfo


class _Reader:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.map: mmap.mmap | None = None
        self.entries: dict[str, _Entry] = {}
        self.prefix = ""
        self.storages: dict[str, _Storage] = {}
        self.classes: dict[str, _ClassInfo] = {}
        self.visits = 0

    # --- the zip file -------------------------------------------------------------------------

    def read(self) -> TorchScriptContents:
        try:
            fd = open_regular(self.path)
        except (NotRegularFile, IsADirectoryError):
            raise _Refused("not a regular file") from None
        info = os.fstat(fd)
        with open(fd, "rb") as file:  # closes fd; the mapping outlives it
            if info.st_size < 22:
                raise _Refused("too short to be a zip file")
            self.size = info.st_size
            self.map = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
            try:
                self._read_directory(file)
                self._check_byteorder()
                self.classes = self._read_code()
            finally:
                if hasattr(self, "archive"):
                    self.archive.close()
        root = self._unpickle(self._stored(f"{self.prefix}data.pkl", _MAX_PICKLE))
        tensors: dict[str, torch.Tensor] = {}
        facts: dict[str, dict[str, Any]] = {}
        self._walk(root, "", tensors, facts, ())
        return TorchScriptContents(tensors, facts)

    def _read_directory(self, file: io.BufferedReader) -> None:
        try:
            self.archive = zipfile.ZipFile(file)
            infos = self.archive.infolist()
        except (zipfile.BadZipFile, ValueError, EOFError, OSError) as exc:
            raise _Refused(f"not a zip file (truncated?): {_line(exc)}") from None
        if len(infos) > _MAX_ENTRIES:
            raise _Refused(f"{len(infos)} zip entries")
        spans = []
        for info in infos:
            name = info.filename
            if name in self.entries:
                raise _Refused(f"zip entry {_show(name)} appears twice")
            if info.flag_bits & 1:
                raise _Refused(f"zip entry {_show(name)} is encrypted")
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise _Refused(f"zip entry {_show(name)} uses compression {info.compress_type}")
            compressed = info.compress_type == zipfile.ZIP_DEFLATED
            start = self._data_start(info)
            if info.compress_size > self.size - start or (
                not compressed and info.file_size != info.compress_size
            ):
                raise _Refused(
                    f"zip entry {_show(name)} declares {info.file_size} bytes, beyond the "
                    f"file's {self.size}"
                )
            self.entries[name] = _Entry(name, compressed, start, info.compress_size, info)
            spans.append((info.header_offset, start + info.compress_size, name))
        spans.sort()
        for (_, end, first), (begin, _, second) in itertools.pairwise(spans):
            if begin < end:
                raise _Refused(f"zip entries {_show(first)} and {_show(second)} overlap")
        pickles = [n for n in self.entries if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise _Refused(f"{len(pickles)} <prefix>/data.pkl entries where one is expected")
        self.prefix = pickles[0][: -len("data.pkl")]

    def _data_start(self, info: zipfile.ZipInfo) -> int:
        """Offset of an entry's data: after its local header, whose lengths we check."""
        assert self.map is not None
        at = info.header_offset
        if at < 0 or at + 30 > self.size or self.map[at : at + 4] != b"PK\x03\x04":
            raise _Refused(f"zip entry {_show(info.filename)} has no local header")
        name_len = int.from_bytes(self.map[at + 26 : at + 28], "little")
        extra_len = int.from_bytes(self.map[at + 28 : at + 30], "little")
        start = at + 30 + name_len + extra_len
        if start > self.size:
            raise _Refused(f"zip entry {_show(info.filename)} starts beyond the end of the file")
        return start

    def _stored(self, name: str, limit: int) -> memoryview:
        """The bytes of an uncompressed entry, as a view of the mapped file."""
        assert self.map is not None
        entry = self.entries.get(name)
        if entry is None:
            raise _Refused(f"no entry {_show(name)}")
        if entry.compressed:
            raise _Refused(f"entry {_show(name)} is compressed; torch stores it uncompressed")
        if entry.size > limit:
            raise _Refused(f"entry {_show(name)} is {entry.size} bytes, more than {limit}")
        return memoryview(self.map)[entry.start : entry.start + entry.size]

    def _check_byteorder(self) -> None:
        name = f"{self.prefix}byteorder"
        if name in self.entries:
            order = bytes(self._stored(name, 16)).decode("ascii", "replace")
            if order != sys.byteorder:
                raise _Refused(f"tensors are stored {_show(order)}-endian; this machine is not")

    # --- the code: class declarations, parsed as text ---------------------------------------

    def _read_code(self) -> dict[str, _ClassInfo]:
        assert self.map is not None
        folder = f"{self.prefix}code/"
        classes: dict[str, _ClassInfo] = {}
        total = 0
        for name, entry in self.entries.items():
            if not (name.startswith(folder) and name.endswith(".py")):
                continue
            info = entry.info
            if info.file_size > _MAX_CODE_FILE or entry.size > _MAX_CODE_FILE:
                raise _Refused(f"code file {_show(name)} is {info.file_size} bytes")
            total += info.file_size
            if total > _MAX_CODE:
                raise _Refused(f"the code files hold more than {_MAX_CODE} bytes")
            if entry.compressed:
                with self.archive.open(info) as f:
                    raw = f.read(_MAX_CODE_FILE + 1)
            else:
                raw = bytes(self._stored(name, _MAX_CODE_FILE))
            module = name[len(folder) : -len(".py")].replace("/", ".")
            classes.update(_parse_code(name, module, raw))
        return classes

    # --- data.pkl -----------------------------------------------------------------------------

    def _unpickle(self, data: memoryview) -> Any:
        try:
            return _Unpickler(io.BytesIO(data), self).load()
        except _Refused:
            raise
        except (Exception, RecursionError, MemoryError) as exc:
            raise _Refused(f"corrupt data.pkl: {_line(exc)}") from None

    def storage(self, pid: Any) -> _Storage:
        """The storage a persistent id names: ``('storage', type, key, location, numel)``."""
        if not (type(pid) is tuple and len(pid) == 5 and type(pid[0]) is str):
            raise _Refused(f"unexpected persistent id {_show(pid)}")
        _, kind, key, _location, numel = pid
        if pid[0] != "storage" or not isinstance(kind, _StorageType) or type(key) is not str:
            raise _Refused(f"unexpected persistent id {_show(pid)}")
        if type(numel) is not int or numel < 0:
            raise _Refused(f"storage {_show(key)} has {_show(numel)} elements")
        known = self.storages.get(key)
        if known is not None:
            if known.dtype != kind.dtype or known.numel != numel:
                raise _Refused(f"storage {_show(key)} is declared twice, differently")
            return known
        itemsize = torch.empty(0, dtype=kind.dtype).element_size()
        name = f"{self.prefix}data/{key}"
        view = self._stored(name, self.size)
        if numel * itemsize > len(view):
            raise _Refused(
                f"storage {_show(key)} holds {len(view)} bytes, not the {numel * itemsize} "
                f"its {numel} {kind.dtype} elements need"
            )
        start = self.entries[name].start
        if numel == 0:
            flat = torch.empty(0, dtype=kind.dtype)
        elif start % itemsize:  # never from torch, which aligns entries: copy to align
            raw = torch.frombuffer(
                self.map, dtype=torch.uint8, count=numel * itemsize, offset=start
            )
            flat = raw.clone().view(kind.dtype)
        else:
            flat = torch.frombuffer(self.map, dtype=kind.dtype, count=numel, offset=start)
        storage = _Storage(key, kind.dtype, numel, flat)
        self.storages[key] = storage
        return storage

    # --- the module tree ----------------------------------------------------------------------

    def _walk(
        self,
        obj: Any,
        prefix: str,
        tensors: dict[str, torch.Tensor],
        facts: dict[str, dict[str, Any]],
        stack: tuple[int, ...],
    ) -> None:
        where = display_path(prefix[:-1])
        if not isinstance(obj, _Placeholder):
            raise _Refused(f"module {where} is a {type(obj).__name__}, not a scripted module")
        cls = self.classes.get(obj.qualname)
        if cls is None or not cls.module:
            raise _Refused(f"module {where}'s class {_show(obj.qualname)} is not declared")
        if id(obj) in stack or len(stack) >= _MAX_DEPTH:
            raise _Refused(f"module {where} nests too deep or contains itself")
        state = obj.state
        self.visits += 1 + (len(state) if type(state) is dict else 0)
        if self.visits > _MAX_VISITS:
            raise _Refused(f"more than {_MAX_VISITS:,} modules and attributes to visit")
        if cls.custom_state:
            if cls.parameters or cls.buffers or cls.submodules:
                raise _Refused(
                    f"module {where} restores its weights with its own __setstate__ code, "
                    "which refq does not run"
                )
            return  # no weights; its code is never run
        if type(state) is not dict:
            raise _Refused(f"module {where} has state {type(state).__name__}, not a dict")
        if set(cls.parameters) & set(cls.buffers):
            raise _Refused(f"module {where} declares a parameter and a buffer of the same name")
        for key in state:
            if not (isinstance(key, str) and key and "." not in key):
                raise _Refused(f"module {where} has an attribute named {_show(key)}")
        for names in (cls.parameters, cls.buffers):
            for name in names:
                if name not in state:
                    raise _Refused(f"module {where} has no attribute {_show(name)}")
        for names in (cls.parameters, cls.buffers):
            for key, value in state.items():
                if key not in names or value is None:
                    continue
                if not isinstance(value, torch.Tensor):
                    raise _Refused(f"{prefix}{key} is a {type(value).__name__}, not a tensor")
                tensors[f"{prefix}{key}"] = value
                if len(tensors) > _MAX_TENSORS:
                    raise _Refused(f"more than {_MAX_TENSORS} tensors")
        found = _facts(obj.qualname, cls, state)
        if found:
            facts[prefix[:-1]] = found
        for key, value in state.items():
            if isinstance(value, _Placeholder) and getattr(
                self.classes.get(value.qualname), "module", False
            ):
                self._walk(value, f"{prefix}{key}.", tensors, facts, (*stack, id(obj)))


@dataclass
class _ClassInfo:
    module: bool  # derives from Module
    parameters: list[str]
    buffers: list[str]
    constants: dict[str, Any]  # Final attributes with literal values
    custom_state: bool  # defines __setstate__
    submodules: bool  # declares attributes of a __torch__ type


_TOP_LEVEL = re.compile(r"(class|def|import|from) |#|\w+ = |$")
_CLASS = re.compile(r"class (\w+)(?:\((.*)\))?:$")
_NAMES = re.compile(r"  (__parameters__|__buffers__) = (.*)$")
_MEMBER = re.compile(r"  (\w+) ?: ?(.+?)(?: = (.+))?$")


def _parse_code(name: str, module: str, raw: bytes) -> dict[str, _ClassInfo]:
    """The classes a code file declares, by qualified name, from the class-level lines that
    torch writes (two spaces in); read as text, nothing evaluated beyond literals."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _Refused(f"code file {_show(name)} is not UTF-8 text") from None
    classes: dict[str, _ClassInfo] = {}
    info = None
    for number, line in enumerate(text.split("\n"), 1):
        line = line.rstrip()
        where = f"code file {_show(name)} line {number}"
        if "\0" in line:
            raise _Refused(f"{where} holds a NUL byte")
        if not line.startswith(" "):
            if not _TOP_LEVEL.match(line):
                raise _Refused(f"{where} is not TorchScript")
            declared = _CLASS.match(line)
            if line.startswith("class ") and not declared:
                raise _Refused(f"{where} declares a class oddly")
            info = None
            if declared:
                bases = [b.strip() for b in (declared.group(2) or "").split(",")]
                info = _ClassInfo("Module" in bases, [], [], {}, False, False)
                classes[f"{module}.{declared.group(1)}"] = info
        elif info is not None and not line.startswith("   "):
            _parse_member(where, line, info)
    return classes


def _parse_member(where: str, line: str, info: _ClassInfo) -> None:
    """One class-level line: the parameter or buffer names, a method, or an attribute."""
    names = _NAMES.match(line)
    if names:
        value = _names_list(names.group(2))
        if value is None:
            raise _Refused(f"{where}: {names.group(1)} is not a list of names")
        if names.group(1) == "__parameters__":
            info.parameters = value
        else:
            info.buffers = value
    elif line.startswith("  def __setstate__("):
        info.custom_state = True
    elif line.startswith(("  __parameters__", "  __buffers__")):
        raise _Refused(f"{where} does not parse")
    else:
        member = _MEMBER.match(line)
        if member is None:
            return
        attribute, annotation, value = member.groups()
        if annotation.startswith("__torch__."):
            info.submodules = True
        elif annotation.startswith("Final[") and attribute in _RECORDED and value is not None:
            constant = _literal(value)
            if type(constant) in (bool, int, float, str):
                info.constants[attribute] = constant


_NAME_LIST = re.compile(r'\[\s*(?:"[^"\\]*"\s*,\s*)*(?:"[^"\\]*"\s*)?\]')
_QUOTED = re.compile(r'"([^"\\]*)"')
_MAX_LITERAL = 1000  # characters of a constant's value: bools, numbers and short strings


def _names_list(text: str) -> list[str] | None:
    """A list of double-quoted names as TorchScript writes them (``["weight", "bias", ]``), in
    time and memory linear in its length; None for anything else."""
    text = text.strip()
    return _QUOTED.findall(text) if _NAME_LIST.fullmatch(text) else None


def _literal(text: str) -> Any:
    """A short Python literal; None for anything else (a long one could cost gigabytes)."""
    if len(text) > _MAX_LITERAL:
        return None
    try:
        return ast.literal_eval(text.strip())
    except (Exception, RecursionError, MemoryError):
        return None


def _facts(qualname: str, cls: _ClassInfo, state: dict[str, Any]) -> dict[str, Any]:
    """The constructor arguments recorded for a module that looks like a torch.nn RNN."""
    recorded = {
        k: v for k, v in state.items() if k in _RECORDED and type(v) in (bool, int, float, str)
    }
    recorded.update(cls.constants)
    if recorded.get("mode") in ("RNN_TANH", "RNN_RELU") and "nonlinearity" not in recorded:
        recorded["nonlinearity"] = recorded["mode"][4:].lower()
    kind = _MANGLE.sub("", qualname).removeprefix("__torch__.torch.nn.modules.rnn.")
    if kind not in KINDS:
        kind = _MODES.get(recorded.get("mode"))  # type: ignore[arg-type]
    if kind is None and not cls.submodules:
        weight, hidden = state.get("weight_ih"), recorded.get("hidden_size")
        if (
            isinstance(weight, torch.Tensor)
            and weight.dim() == 2
            and type(hidden) is int
            and hidden > 0
        ):
            gates = weight.shape[0] // hidden if weight.shape[0] % hidden == 0 else 0
            cell = kind_with(gates, cell=True)
            kind = cell.name if cell else None
        if kind == "GRUCell" and "nonlinearity" in recorded:
            kind = None
    if kind is None:
        return {}
    found = {}
    for key in KINDS[kind].arguments:
        value, argument = recorded.get(key), ARGUMENTS[key]
        if argument.type is float and type(value) in (int, float):
            found[key] = float(value)
        elif type(value) is argument.type and (
            not isinstance(argument.check, tuple) or value in argument.check
        ):
            found[key] = value
    return found


# --- the restricted unpickler ---------------------------------------------------------------


@dataclass(frozen=True)
class _StorageType:
    """What ``torch.FloatStorage`` and its kind stand for here: a dtype."""

    dtype: torch.dtype


@dataclass(frozen=True, eq=False)
class _Storage:
    key: str
    dtype: torch.dtype
    numel: int
    flat: torch.Tensor


class _Placeholder:
    """An object of a class the archive declares: records its state, does nothing else."""

    __slots__ = ("state",)
    qualname = ""

    def __setstate__(self, state: Any) -> None:
        object.__setattr__(self, "state", state)


def _int(value: Any) -> bool:
    return type(value) is int


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *_: Any) -> torch.Tensor:
    if not isinstance(storage, _Storage):
        raise _Refused(f"a tensor rebuilt from {type(storage).__name__}, not a storage")
    shape = f"size {_show(size)}, stride {_show(stride)}, offset {_show(offset)}"
    if not (
        isinstance(size, tuple)
        and isinstance(stride, tuple)
        and len(size) == len(stride) <= 64
        and all(_int(n) and n >= 0 for n in size)
        and all(_int(n) and n >= 0 for n in stride)
        and _int(offset)
        and offset >= 0
    ):
        raise _Refused(f"a tensor of storage {_show(storage.key)} has {shape}")
    if 0 not in size:
        last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
        if last >= storage.numel:
            raise _Refused(
                f"a tensor with {shape} does not fit in storage {_show(storage.key)} of "
                f"{storage.numel} elements"
            )
    elif offset > storage.numel:
        raise _Refused(f"a tensor with {shape} starts beyond storage {_show(storage.key)}")
    return storage.flat.as_strided(size, stride, offset)


def _rebuild_tensor_v2(
    storage: Any,
    offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any = False,
    hooks: Any = None,
    metadata: Any = None,
) -> torch.Tensor:
    if metadata:
        raise _Refused("a tensor with Python metadata")
    return _rebuild_tensor(storage, offset, size, stride)


def _rebuild_parameter(data: Any, requires_grad: Any = False, hooks: Any = None, *_: Any) -> Any:
    if not isinstance(data, torch.Tensor):
        raise _Refused(f"a parameter of {type(data).__name__}, not a tensor")
    return data


def _ordered_dict(*args: Any) -> dict:
    if args and not (len(args) == 1 and type(args[0]) in (list, tuple)):
        raise _Refused("an OrderedDict built from something other than a list")
    pairs = args[0] if args else []
    if not all(type(p) is tuple and len(p) == 2 for p in pairs):
        raise _Refused("an OrderedDict built from something other than pairs")
    return dict(pairs)


def _same(data: Any) -> Any:
    if type(data) is not list:
        raise _Refused(f"a list builder applied to {type(data).__name__}")
    return data


def _restore_type_tag(value: Any, type_str: Any = None) -> Any:
    return value


_FUNCTIONS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): _ordered_dict,
    ("torch.jit._pickle", "build_intlist"): _same,
    ("torch.jit._pickle", "build_tensorlist"): _same,
    ("torch.jit._pickle", "build_doublelist"): _same,
    ("torch.jit._pickle", "build_boollist"): _same,
    ("torch.jit._pickle", "restore_type_tag"): _restore_type_tag,
}
_CALLABLE = frozenset(id(f) for f in _FUNCTIONS.values())

_P = pickle
_ALLOWED_OPCODES = [
    _P.PROTO, _P.FRAME, _P.STOP, _P.MARK, _P.POP, _P.POP_MARK, _P.DUP, _P.NONE, _P.NEWTRUE,
    _P.NEWFALSE, _P.INT, _P.BININT, _P.BININT1, _P.BININT2, _P.LONG, _P.LONG1, _P.LONG4,
    _P.FLOAT, _P.BINFLOAT, _P.BINSTRING, _P.SHORT_BINSTRING, _P.UNICODE, _P.BINUNICODE,
    _P.SHORT_BINUNICODE, _P.BINUNICODE8, _P.BINBYTES, _P.SHORT_BINBYTES, _P.BINBYTES8,
    _P.EMPTY_TUPLE, _P.TUPLE, _P.TUPLE1, _P.TUPLE2, _P.TUPLE3, _P.EMPTY_LIST, _P.LIST,
    _P.EMPTY_DICT, _P.DICT, _P.EMPTY_SET, _P.FROZENSET, _P.GET, _P.BINGET, _P.LONG_BINGET,
    _P.PUT, _P.BINPUT, _P.LONG_BINPUT, _P.MEMOIZE, _P.GLOBAL, _P.STACK_GLOBAL, _P.PERSID,
    _P.BINPERSID,
]  # fmt: skip


class _Unpickler(pickle._Unpickler):  # the Python one, whose opcodes can be replaced
    """Knows tensor rebuilds, storage types and placeholders; refuses every other global and
    every opcode that could call or mutate anything else."""

    def __init__(self, file: io.BytesIO, reader: _Reader) -> None:
        super().__init__(file, fix_imports=False)
        self.reader = reader
        self.placeholders: dict[str, type[_Placeholder]] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _FUNCTIONS:
            return _FUNCTIONS[module, name]
        if module == "torch" and name.endswith("Storage") and name[:-7] in _DTYPES:
            return _StorageType(_DTYPES[name[:-7]])
        if module == "__torch__" or module.startswith("__torch__."):
            qualname = f"{module}.{name}"
            if qualname not in self.placeholders:
                self.placeholders[qualname] = type(
                    "Placeholder", (_Placeholder,), {"__slots__": (), "qualname": qualname}
                )
            return self.placeholders[qualname]
        raise _Refused(f"data.pkl refers to global {_show(f'{module}.{name}')}, which refq refuses")

    def persistent_load(self, pid: Any) -> Any:
        return self.reader.storage(pid)

    def load_reduce(self) -> None:
        args = self.stack.pop()
        func = self.stack[-1]
        if id(func) not in _CALLABLE or type(args) is not tuple:
            raise _Refused(f"data.pkl calls {_show(func)}, which refq refuses")
        self.stack[-1] = func(*args)

    def load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        if not (isinstance(cls, type) and issubclass(cls, _Placeholder)) or not (
            type(args) is tuple and not args
        ):
            raise _Refused(f"data.pkl creates {_show(cls)}, which refq refuses")
        self.append(cls.__new__(cls))

    def load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if not isinstance(inst, _Placeholder) or hasattr(inst, "state"):
            raise _Refused(f"data.pkl sets the state of {type(inst).__name__}")
        inst.__setstate__(state)

    def load_setitem(self) -> None:
        value = self.stack.pop()
        key = self.stack.pop()
        self._target(dict)[key] = value

    def load_setitems(self) -> None:
        items = self.pop_mark()
        target = self._target(dict)
        for i in range(0, len(items) - 1, 2):
            target[items[i]] = items[i + 1]

    def load_append(self) -> None:
        value = self.stack.pop()
        self._target(list).append(value)

    def load_appends(self) -> None:
        items = self.pop_mark()
        self._target(list).extend(items)

    def load_additems(self) -> None:
        items = self.pop_mark()
        self._target(set).update(items)

    def _target(self, kind: type) -> Any:
        target = self.stack[-1]
        if type(target) is not kind:
            raise _Refused(f"data.pkl adds items to a {type(target).__name__}")
        return target


def _refuse_opcode(code: int) -> Any:
    def refuse(self: _Unpickler) -> None:
        raise _Refused(f"data.pkl uses pickle opcode {bytes([code])!r}, which refq refuses")

    return refuse


_Unpickler.dispatch = {code: _refuse_opcode(code) for code in range(256)}
_Unpickler.dispatch.update({op[0]: pickle._Unpickler.dispatch[op[0]] for op in _ALLOWED_OPCODES})
_Unpickler.dispatch.update(
    {
        pickle.REDUCE[0]: _Unpickler.load_reduce,
        pickle.NEWOBJ[0]: _Unpickler.load_newobj,
        pickle.BUILD[0]: _Unpickler.load_build,
        pickle.SETITEM[0]: _Unpickler.load_setitem,
        pickle.SETITEMS[0]: _Unpickler.load_setitems,
        pickle.APPEND[0]: _Unpickler.load_append,
        pickle.APPENDS[0]: _Unpickler.load_appends,
        pickle.ADDITEMS[0]: _Unpickler.load_additems,
    }
)
