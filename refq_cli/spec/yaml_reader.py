r"""Reading YAML documents (specs, manifests) with a position for every error.

Documents are composed into PyYAML's node tree with its safe loader (no Python tags), and
walked by :class:`YamlReader`, which checks each value against a table of :class:`Field`\ s and
raises errors that start with ``file:line:column``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import yaml
from yaml.constructor import SafeConstructor
from yaml.parser import ParserError

from refq_cli.errors import RefqError, did_you_mean, printable, shorten
from refq_cli.io.inputs import read_at_most, why_unreadable

MAX_BYTES = 4 * 1024 * 1024
MAX_NODES = 100_000


@dataclass(frozen=True)
class Field:
    """One key of the spec: its kind of value and what it means."""

    kind: str  # enum | int | number | bool | str | numbers | ints
    doc: str
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False


@dataclass(frozen=True)
class Loc:
    """A position in a spec file, printed as ``file:line:column`` (both 1-based)."""

    file: str
    line: int
    column: int

    def __str__(self) -> str:  # line 0: a document without positions (a spec given as a dict)
        return f"{self.file}:{self.line}:{self.column}" if self.line else self.file

    @classmethod
    def of(cls, file: str, node: yaml.Node) -> Loc:
        return cls(file, node.start_mark.line + 1, node.start_mark.column + 1)


@dataclass(frozen=True)
class Setting:
    """A value from the spec and where it was written."""

    value: Any
    loc: Loc


Settings = dict[str, Setting]


def _is_finite(value: float) -> bool:
    """Whether ``value`` is a finite float, or an integer a float can hold."""
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer of more than 308 digits
        return False


class _TooManyNodes(Exception):
    def __init__(self, mark: yaml.Mark) -> None:
        self.mark = mark


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, reading ``1e-3`` as a float as YAML 1.2 (and editors) do, and
    stopping at the :data:`MAX_NODES`-th node: composing millions of them first would cost a
    minute and gigabytes (aliases are counted where they are used, by :class:`YamlReader`)."""

    composed = 0

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        # The start events of the flow collections (``[``, ``{``) being composed, innermost last;
        # left as they are by an error, so that it can name the one that was not closed.
        self.open_flows: list[yaml.CollectionStartEvent] = []

    def compose_node(self, parent: Any, index: Any) -> Any:
        self.composed += 1
        if self.composed > MAX_NODES:
            raise _TooManyNodes(self.peek_event().start_mark)
        event = self.peek_event()
        flow = isinstance(event, yaml.CollectionStartEvent) and bool(event.flow_style)
        if flow:
            self.open_flows.append(event)
        node = super().compose_node(parent, index)
        if flow:
            self.open_flows.pop()
        return node


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _position(mark: yaml.Mark) -> str:
    return f"{mark.line + 1}:{mark.column + 1}"


# PyYAML's names for what it was reading when it failed, where they are not the usual words.
_CONSTRUCTS = {
    "block collection": "block sequence",
    "quoted scalar": "quoted string",
    "double-quoted scalar": "double-quoted string",
    "simple key": "key",
}
# What PyYAML's problems say when the file ended with a construct still open.
_ENDS = ("<stream end>", "end of stream", "document separator", "<document start>")
_QUOTED_LIMIT = 300  # characters of PyYAML's problem and context, which quote the file


def _syntax_error(exc: yaml.MarkedYAMLError, open_flows: Sequence[yaml.Event]) -> str:
    """``YAML syntax error: ...`` for ``exc``, naming where the construct it was reading began
    when that is elsewhere: an unclosed ``[`` is otherwise found only at the end of the file."""
    problem = printable(exc.problem or "", _QUOTED_LIMIT)
    context = printable(exc.context or "", _QUOTED_LIMIT)
    mark, began = exc.problem_mark, exc.context_mark
    if mark is None or not problem:
        return f"YAML syntax error: {problem or context}"
    reading = re.fullmatch(r"while (?:parsing|scanning) an? (.+)", context)
    construct = reading[1] if reading else None
    if began is not None and _position(began) == _position(mark):
        began = None
    if began is None and isinstance(exc, ParserError) and open_flows:
        # "while parsing a flow node" at the place of the problem itself: name the sequence or
        # mapping around that node (the composer has taken every event before the parser's error)
        began = open_flows[-1].start_mark
        kind = "sequence" if isinstance(open_flows[-1], yaml.SequenceStartEvent) else "mapping"
        construct = f"flow {kind}"
        if _position(began) == _position(mark):
            began = None
    if began is None:
        return f"YAML syntax error: {problem}"
    at = _position(began)
    if construct is None:  # the composer's: "found duplicate anchor 'a'; first occurrence"
        return f"YAML syntax error: {context} at {at}, {problem}"
    construct = _CONSTRUCTS.get(construct, construct)
    if any(end in problem for end in _ENDS):
        return f"YAML syntax error: {problem} (the {construct} begun at {at} is not closed)"
    return f"YAML syntax error: {problem} (in the {construct} begun at {at})"


def read_document(path: str | Path, what: str, error_type: type[RefqError]) -> yaml.Node:
    """The composed root node of a YAML file; errors name the file (and line and column)."""
    path = Path(path)
    name = str(path)
    try:
        data = read_at_most(path, MAX_BYTES)
    except OSError as exc:
        raise error_type(f"{name}: {why_unreadable(exc, what)}") from None
    if len(data) > MAX_BYTES:
        raise error_type(f"{name}: too large for a {what} (limit {MAX_BYTES:,} bytes)")
    return compose(data, name, what, error_type)


def compose(data: bytes | str, name: str, what: str, error_type: type[RefqError]) -> yaml.Node:
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data[: exc.start].count(b"\n") + 1
            raise error_type(f"{name}:{line}:1: the {what} is not UTF-8 text") from None
    else:
        text = data
    loader: _Loader | None = None
    try:
        loader = _Loader(text)
        root = loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{name}:{_position(mark)}" if mark else name
        flows = loader.open_flows if loader is not None else []
        raise error_type(f"{where}: {_syntax_error(exc, flows)}") from None
    except yaml.YAMLError as exc:
        raise error_type(f"{name}: YAML error: {exc}") from None
    except RecursionError:
        raise error_type(f"{name}: the {what} is nested too deeply") from None
    except _TooManyNodes as exc:
        raise error_type(
            f"{name}:{exc.mark.line + 1}:{exc.mark.column + 1}: the {what} has more than "
            f"{MAX_NODES} values"
        ) from None
    finally:
        if loader is not None:
            loader.dispose()
    if root is None:
        raise error_type(f"{name}:1:1: the {what} is empty; it needs at least 'version: 1'")
    return root


class YamlReader:
    """Walks a composed YAML node tree, checking each value against field tables.

    Errors are ``error_type`` with ``file:line:column`` first; ``what`` names the document
    ("spec", "manifest") in messages.
    """

    _SCALAR_TAGS: ClassVar[frozenset[str]] = frozenset(
        {"tag:yaml.org,2002:" + t for t in ("str", "int", "float", "bool", "null")}
    )

    def __init__(
        self, name: str, what: str, error_type: type[RefqError], *, positions: bool = True
    ) -> None:
        self.name = name
        self.positions = positions  # False: the document was made from data, not written
        self.what = what
        self.error_type = error_type
        self.nodes = 0
        self.constructor = SafeConstructor()

    def loc(self, node: yaml.Node) -> Loc:
        return Loc.of(self.name, node) if self.positions else Loc(self.name, 0, 0)

    def fail(self, node: yaml.Node, message: str) -> RefqError:
        return self.error_type(f"{self.loc(node)}: {message}")

    def count(self, node: yaml.Node) -> None:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise self.fail(node, f"the {self.what} has more than {MAX_NODES} values (alias bomb?)")

    def scalar(self, node: yaml.Node) -> Any:
        self.count(node)
        if not isinstance(node, yaml.ScalarNode):
            raise self.fail(node, "expected a single value here")
        if node.tag not in self._SCALAR_TAGS:
            raise self.fail(node, f"tag {node.tag!r} is not allowed in a {self.what}")
        try:
            return self.constructor.construct_object(node)
        except (yaml.YAMLError, ValueError) as exc:
            raise self.fail(node, f"bad value: {exc}") from None

    def mapping(
        self, node: yaml.Node, allowed: Sequence[str] | None, what: str
    ) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        """Keys (as strings) to (key node, value node); duplicate and unknown keys are errors."""
        self.count(node)
        if not isinstance(node, yaml.MappingNode) or node.tag != "tag:yaml.org,2002:map":
            raise self.fail(node, f"{what} must be a mapping of keys to values")
        out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise self.fail(key_node, f"merge keys (<<) are not supported in a {self.what}")
            key = self.scalar(key_node)
            if not isinstance(key, str):
                raise self.fail(key_node, f"keys must be text, got {key!r}")
            if key in out:
                first = self.loc(out[key][0])
                raise self.fail(key_node, f"duplicate key {key!r} (first given at {first})")
            if allowed is not None and key not in allowed:
                raise self.fail(
                    key_node,
                    f"unknown key {key!r} in {what}{did_you_mean(key, allowed)} "
                    f"(allowed: {', '.join(allowed)})",
                )
            out[key] = (key_node, value_node)
        return out

    def sequence(self, node: yaml.Node, what: str) -> list[yaml.Node]:
        self.count(node)
        if not isinstance(node, yaml.SequenceNode):
            raise self.fail(node, f"{what} must be a list")
        if node.tag != "tag:yaml.org,2002:seq":
            raise self.fail(node, f"tag {node.tag!r} is not allowed in a {self.what}")
        return list(node.value)

    def value(self, node: yaml.Node, key: str, spec: Field) -> Any:
        if spec.kind in ("numbers", "ints") and isinstance(node, yaml.SequenceNode):
            items = [
                self.value(
                    n, key, replace(spec, kind=spec.kind[:-1] if spec.kind == "ints" else "number")
                )
                for n in self.sequence(node, key)
            ]
            if not items:
                raise self.fail(node, f"{key} must not be an empty list")
            return items
        value = self.scalar(node)
        kind = {"numbers": "number", "ints": "int"}.get(spec.kind, spec.kind)
        if kind == "enum":
            if not isinstance(value, str) or value.lower() not in spec.choices:
                hint = did_you_mean(str(value).lower(), spec.choices)
                raise self.fail(
                    node, f"{key} must be one of {', '.join(spec.choices)}, got {value!r}{hint}"
                )
            return value.lower()
        if kind == "bool":
            if not isinstance(value, bool):
                raise self.fail(node, f"{key} must be true or false, got {value!r}")
            return value
        if kind == "str":
            if not isinstance(value, str) or not value:
                raise self.fail(node, f"{key} must be non-empty text, got {value!r}")
            return value
        if kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise self.fail(node, f"{key} must be an integer, got {shorten(value)}")
            if not -(2**63) <= value < 2**63:
                raise self.fail(node, f"{key} must be a 64-bit integer, got {shorten(value)}")
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(node, f"{key} must be a number, got {shorten(value)}")
        elif not _is_finite(value):
            raise self.fail(node, f"{key} must be a finite number, got {shorten(value)}")
        self.check_range(node, key, spec, value)
        return value

    def check_range(self, node: yaml.Node, key: str, spec: Field, value: float) -> None:
        lo, hi = spec.minimum, spec.maximum
        if lo is not None and (value <= lo if spec.exclusive_minimum else value < lo):
            bound = f"greater than {lo:g}" if spec.exclusive_minimum else f"at least {lo:g}"
            raise self.fail(node, f"{key} must be {bound}, got {shorten(value)}")
        if hi is not None and value > hi:
            raise self.fail(node, f"{key} must be at most {hi:g}, got {shorten(value)}")

    def settings(self, node: yaml.Node, fields: Mapping[str, Field], what: str) -> Settings:
        items = self.mapping(node, list(fields), what)
        return {
            key: Setting(self.value(v, self.label(what, key), fields[key]), self.loc(v))
            for key, (_, v) in items.items()
        }

    def label(self, where: str, key: str) -> str:
        """How a message names ``key`` under ``where``: a document with positions needs only the
        key (its line and column say where); one made from data, its whole path."""
        return key if self.positions else f"{where}.{key}"

    def version(
        self, top: Mapping[str, tuple[yaml.Node, yaml.Node]], root: yaml.Node, supported: int
    ) -> None:
        """Check the document's ``version:`` key."""
        if "version" not in top:
            raise self.fail(root, f"missing 'version: {supported}' at the top of the {self.what}")
        node = top["version"][1]
        version = self.scalar(node)
        if type(version) is not int or version != supported:
            raise self.fail(
                node,
                f"{self.what} version {shorten(version)} is not supported; this refq reads version "
                f"{supported}",
            )
