"""Opening input files safely: regular files only, opened without waiting, read within limits.

A FIFO would block a plain ``open`` forever and a device (``/dev/zero``) can be read forever, so
every file refq reads (checkpoints, calibration files, specs, manifests) is opened here first.
Plain Python: importing this does not import torch.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path


class NotRegularFile(OSError):
    """A FIFO, device or socket where refq expects a file."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(errno.EINVAL, "not a regular file (a FIFO, device or socket)", str(path))


def open_regular(path: str | Path) -> int:
    """A read-only descriptor of ``path``. Raises IsADirectoryError for a folder and
    NotRegularFile for a FIFO, device or socket, without blocking on either; OSError as
    ``os.open`` raises it otherwise."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, "is a directory", str(path))
        if not stat.S_ISREG(mode):
            raise NotRegularFile(path)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_at_most(path: str | Path, limit: int) -> bytes:
    """The bytes of regular file ``path``, or its first ``limit + 1`` bytes when it holds more
    (so callers can tell it is too large without reading a file that still grows)."""
    with open(open_regular(path), "rb") as f:
        return f.read(limit + 1)


def why_unreadable(exc: OSError, what: str) -> str:
    """The end of a one-line message saying why the ``what`` file (checkpoint, spec, ...) that
    :func:`open_regular` was given cannot be read."""
    a = "an" if what[:1] in "aeiou" else "a"
    if isinstance(exc, FileNotFoundError):
        return f"no such {what} file"
    if isinstance(exc, IsADirectoryError):
        return f"is a directory, not {a} {what} file"
    if isinstance(exc, NotRegularFile):
        return f"is not a regular file (a FIFO, device or socket); give {a} {what} file"
    return f"cannot read the {what}: {exc.strerror or exc}"
