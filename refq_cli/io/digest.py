"""SHA-256 of input files, optionally computed in a background thread.

``start(path)`` begins hashing a file; ``sha256_of(path)`` returns its digest, waiting for a
hash started earlier or computing it now; ``discard(path)`` stops a hash no longer wanted. A
conversion starts hashing its input before it imports torch (1.5 s of mostly single-threaded
work), and hashlib releases the GIL, so with a second core the digest costs no wall time. A file
that changed since ``start`` (another size, modification time or inode) is hashed again, and
the stale hash is stopped. This module does not import torch.
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
from pathlib import Path

from refq_cli.io.inputs import open_regular

_BLOCK = 1 << 24


class _Cancelled(Exception):
    """A hash stopped because its digest is no longer wanted."""


class _Hashing(threading.Thread):
    def __init__(self, path: Path) -> None:
        super().__init__(name=f"sha256 {path}", daemon=True)
        self.path = path
        self.digest: str | None = None
        self.error: OSError | None = None
        self.cancelled = threading.Event()

    def run(self) -> None:
        try:
            self.digest = _sha256(self.path, self.cancelled)
        except OSError as exc:
            self.error = exc
        except _Cancelled:
            pass


_started: dict[tuple, _Hashing] = {}
_lock = threading.Lock()


def _identity(path: Path) -> tuple:
    st = os.stat(path)
    return (
        os.path.realpath(path),
        st.st_dev,
        st.st_ino,
        st.st_size,
        st.st_mtime_ns,
        st.st_ctime_ns,
        stat.S_ISREG(st.st_mode),
    )


def start(path: str | Path) -> None:
    """Begin hashing ``path`` in the background; a path that cannot be read is left alone
    (``sha256_of`` reports it)."""
    try:
        key = _identity(Path(path))
    except OSError:
        return
    if not key[-1]:  # a FIFO would block the thread, a device could be read forever
        return
    with _lock:
        if key in _started:
            return
        job = _started[key] = _Hashing(Path(path))
    job.start()


def sha256_of(path: str | Path) -> str:
    """The hex SHA-256 of ``path``'s bytes. Raises OSError when it cannot be read."""
    path = Path(path)
    key = _identity(path)
    job = _take(key[0], keep=key)
    if job is None:
        return _sha256(path)
    job.join()
    if job.error is not None:
        raise job.error
    # no digest: the thread never ran here (this process was forked from the one that started it)
    return job.digest if job.digest is not None else _sha256(path)


def discard(path: str | Path) -> None:
    """Stop and forget any hash started for ``path``: its digest will not be asked for."""
    _take(os.path.realpath(path), keep=None)


def _take(realpath: str, keep: tuple | None) -> _Hashing | None:
    """Remove the hashes started for ``realpath``: return the one for identity ``keep`` and
    stop the others, which hash what the file no longer holds."""
    with _lock:
        taken = {key: _started.pop(key) for key in list(_started) if key[0] == realpath}
    kept = taken.pop(keep, None)
    for job in taken.values():
        job.cancelled.set()
    return kept


def _sha256(path: Path, cancelled: threading.Event | None = None) -> str:
    digest = hashlib.sha256()
    with open(open_regular(path), "rb", buffering=0) as f:
        left = os.fstat(f.fileno()).st_size  # no more: a file still growing is refused later
        buffer = bytearray(min(_BLOCK, max(1, left)))
        view = memoryview(buffer)
        while left and (size := f.readinto(view[: min(len(buffer), left)])):
            if cancelled is not None and cancelled.is_set():
                raise _Cancelled
            digest.update(view[:size])
            left -= size
    return digest.hexdigest()
