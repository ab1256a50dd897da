"""Standard streams that a closed pipe or a narrow encoding cannot turn into an error, and
text from untrusted files shown on them as written."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterable
from typing import IO, Any

from refq_cli.errors import printable


class QuietPipe:
    """A standard stream that drops its output, quietly, once its reader has gone.

    Python ignores SIGPIPE, so writing into a pipe whose reader closed it (``refq schema | head
    -1``) raises BrokenPipeError: out of click's echo (then "refq: internal error"), out of rich's
    print (which exits 1), or at exit, out of Python's last flush ("Exception ignored", exit 120).
    Through this wrapper the first such error points the stream's descriptor at /dev/null instead:
    the command goes on with its work, its output lost, and exits with the code that work earns.
    Text the stream's encoding cannot hold (a path with ``ü`` under ``PYTHONIOENCODING=ascii``)
    is written with backslash escapes (``\\xfc``) instead of failing.
    Everything else goes to the stream itself, its ``buffer`` (where click writes bytes, and
    where it reads from when it re-wraps a stream it finds misconfigured) wrapped the same way.
    """

    def __init__(self, stream: IO[Any]) -> None:
        self._stream = stream

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    @property
    def buffer(self) -> QuietPipe:
        return QuietPipe(self._stream.buffer)  # type: ignore[attr-defined]

    def write(self, data: Any) -> int:
        try:
            return self._stream.write(data)
        except UnicodeEncodeError:  # a stream that cannot show the text (PYTHONIOENCODING=ascii)
            encoding = getattr(self._stream, "encoding", None) or "ascii"
            return self.write(data.encode(encoding, "backslashreplace").decode(encoding))
        except OSError as exc:
            self._drop_output(exc)
            return len(data)

    def writelines(self, lines: Iterable[Any]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as exc:
            self._drop_output(exc)

    def _drop_output(self, exc: OSError) -> None:
        """Re-raise ``exc`` unless it says the pipe is broken; if it does, write to /dev/null
        from now on (what is still buffered too, so Python's flush at exit succeeds)."""
        if exc.errno != errno.EPIPE:
            raise exc
        devnull = os.open(os.devnull, os.O_WRONLY)
        with contextlib.suppress(OSError, ValueError):  # no descriptor: each write fails, dropped
            os.dup2(devnull, self._stream.fileno())
        os.close(devnull)


def plain(value: object) -> Any:
    """``value`` as rich text that shows as written: escaped (:func:`printable`), no markup,
    no emoji codes. Names, paths and metadata come from untrusted files."""
    from rich.text import Text

    return Text(printable(str(value)))
