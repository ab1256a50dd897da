"""The error types refq raises for bad input, and how refq shows untrusted text and values.

Plain Python: importing this does not import torch. Each error carries a one-line message saying
what is wrong, where, and how to fix it; the CLI prints that line (through :func:`printable`)
and exits with ``exit_code``.

Keys, paths and metadata come from files refq did not write. Everything refq prints as text goes
through :func:`printable`, so that no such value can start a line of its own (a CI workflow
command such as ``::error::``), move the cursor or reorder text; :func:`shorten` is the short
``repr`` messages quote values with; :func:`strict_json` is the JSON refq prints and writes.
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
import json
import math
import os
import reprlib
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

MESSAGE_LIMIT = 2000  # characters of a printed line; longer ones lose their middle

# How messages name the caller's arguments: as Python keywords (``force=True``), or, once the
# CLI has said so (:func:`naming_flags`), as its flags (``--force``).
_FLAGS: contextvars.ContextVar[bool] = contextvars.ContextVar("refq_flags", default=False)
_FLAG_OF = {"spec": "--qconfig", "workers": "--jobs"}  # flags other than --name-with-dashes


@contextlib.contextmanager
def naming_flags() -> Iterator[None]:
    """Within it, messages name arguments by their CLI flags (a command of the CLI runs in it)."""
    token = _FLAGS.set(True)
    try:
        yield
    finally:
        _FLAGS.reset(token)


def set_naming_flags(on: bool) -> None:
    """:func:`naming_flags` for the rest of this process (a worker of a CLI command)."""
    _FLAGS.set(on)


def names_flags() -> bool:
    """Whether messages name arguments by their CLI flags here (:func:`naming_flags`)."""
    return _FLAGS.get()


_SWITCH: Any = object()  # argument() of a switch: no value to show


def argument(name: str, value: Any = _SWITCH) -> str:
    """How a message names the caller's argument ``name`` (a Python keyword of refq's API):
    ``--output out/a.st`` or ``output='out/a.st'`` with a ``value``, and for a switch
    ``--force`` or ``force=True``."""
    if _FLAGS.get():
        flag = _FLAG_OF.get(name, "--" + name.replace("_", "-"))
        return flag if value is _SWITCH else f"{flag} {value}"
    if value is _SWITCH:
        return f"{name}=True"
    text = str(value) if isinstance(value, (str, os.PathLike)) else value
    return f"{name}={text!r}"


class RefqError(Exception):
    """Base class of every error refq reports to users as one line."""

    exit_code = 2


class QParamsError(RefqError, ValueError):
    """Quantization parameters that are missing, misnamed or impossible.

    ``field`` names the offending parameter (``scale``, ``zero_point``, ...) when there is one.
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class SpecError(RefqError):
    """A spec file that cannot be read or does not fit the model."""


class CheckpointError(RefqError):
    """An input checkpoint that cannot be read, is refused, or holds inconsistent weights."""


class ConversionError(RefqError):
    """A conversion that failed or missed its quality gate."""

    exit_code = 1


class RefqWarning(UserWarning):
    """Something the caller should check, which did not stop the work: the facts a conversion
    had to assume (the CLI prints it as ``refq: warning: ...``)."""


class ArtifactError(RefqError):
    """An artifact that cannot be written or read back."""


class ExportError(RefqError):
    """A module that cannot be exported as asked: a format, opset or target that cannot
    express it, a missing optional dependency, integer codes out of date while tracing."""


_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escaped(char: str) -> str:
    """``char`` itself when printable, else its backslash escape (as ``repr`` writes it).

    Not printable: C0 and C1 controls, DEL, line and paragraph separators, format characters
    (bidi overrides and isolates, zero-width ones), spaces other than U+0020, surrogates and
    unassigned code points.
    """
    if char.isprintable():
        return char
    if char in _NAMED_ESCAPES:
        return _NAMED_ESCAPES[char]
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def _fit(chars: Any, budget: int) -> tuple[list[str], int]:
    """Escaped characters from ``chars`` while they fit in ``budget``, and how many were used."""
    pieces: list[str] = []
    used = 0
    for char in chars:
        piece = _escaped(char)
        if len(piece) > budget:
            break
        pieces.append(piece)
        budget -= len(piece)
        used += 1
    return pieces, used


def printable(text: str, limit: int = MESSAGE_LIMIT) -> str:
    """``text`` as one printable line of at most about ``limit`` characters.

    Characters that are not printable are escaped as ``repr`` escapes them (a newline becomes
    ``\\n``, ESC ``\\x1b``); a longer line keeps its start and end, with the number of
    characters left out between them.
    """
    head, used = _fit(text, limit)
    if used == len(text):
        return "".join(head)
    head, used = _fit(text, limit * 3 // 4)
    tail, kept = _fit(reversed(text[used:]), limit // 4)
    cut = len(text) - used - kept
    return f"{''.join(head)} [... {cut} characters cut ...] {''.join(reversed(tail))}"


def markdown_cell(text: str) -> str:
    """``text`` for a cell of a Markdown table: printable, with its pipes escaped and ``<``,
    ``>`` and ``&`` as entities, so that a name (``<root>``, a key holding ``<!--``) shows as
    text where the table is rendered, not as HTML."""
    text = printable(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return text.replace("|", "\\|")


_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxdict = 80, 80, 8, 8
_REPR.maxlong = 40


def shorten(value: object) -> str:
    """``repr(value)`` cut to a readable length: values in messages come from untrusted files."""
    return _REPR.repr(value)


def finite_or_none(value: Any) -> Any:
    """``value`` with every NaN and infinity in it (in lists, tuples and dicts) made None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def strict_json(value: Any, *, indent: int | None = 2, sort_keys: bool = False) -> str:
    """``value`` as strict JSON (RFC 8259), which has no NaN or Infinity: those become null.

    ASCII only, so no control character or separator in a key or path reaches a terminal raw.
    """
    return json.dumps(finite_or_none(value), indent=indent, sort_keys=sort_keys, allow_nan=False)


# Warnings torch prints that say nothing to a refq user.
TORCH_NOISE = (
    "Failed to initialize NumPy",
    "LSTM with projections is not supported with oneDNN",
    "dropout option adds dropout after all but last recurrent layer",
)


def ignore_torch_noise() -> None:
    """Leave out :data:`TORCH_NOISE` from the warnings this process prints."""
    for message in TORCH_NOISE:
        warnings.filterwarnings("ignore", message=message)


def did_you_mean(word: str, choices: Iterable[str], *, aside: bool = False) -> str:
    """The closest of ``choices`` to a mistyped ``word``, to end a message with:
    ``; did you mean 'x'?``, or `` (did you mean 'x'?)`` with ``aside``; "" when none is close."""
    hint = difflib.get_close_matches(word, list(choices), n=1)
    if not hint:
        return ""
    return f" (did you mean {hint[0]!r}?)" if aside else f"; did you mean {hint[0]!r}?"


def plural(count: int, noun: str) -> str:
    """``count`` and ``noun``, made plural unless the count is one: "1 weight", "2 weights"."""
    return f"{count:,} {noun}" if count == 1 else f"{count:,} {noun}s"
