"""SHA-256 of input files, optionally computed in a background thread.

``start(path)`` begins hashing a file; ``sha256_of(path)`` returns its digest, waiting for a
hash started earlier or computing it now. A conversion starts hashing its input before it
imports torch (1.5 s of mostly single-threaded work), and hashlib releases the GIL, so with a
second core the digest costs no wall time. A file that changed since ``start`` (another size,
modification time or inode) is hashed again. This module does not import torch.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

_BLOCK = 1 << 24


class _Hashing(threading.Thread):
    def __init__(self, path: Path) -> None:
        super().__init__(name=f"sha256 {path}", daemon=True)
        self.path = path
        self.digest: str | None = None
        self.error: OSError | None = None

    def run(self) -> None:
        try:
            self.digest = _sha256(self.path)
        except OSError as exc:
            self.error = exc


_started: dict[tuple, _Hashing] = {}
_lock = threading.Lock()


def _identity(path: Path) -> tuple:
    st = os.stat(path)
    return (os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def start(path: str | Path) -> None:
    """Begin hashing ``path`` in the background; a path that cannot be read is left alone
    (``sha256_of`` reports it)."""
    try:
        key = _identity(Path(path))
    except OSError:
        return
    with _lock:
        if key in _started:
            return
        job = _started[key] = _Hashing(Path(path))
    job.start()


def sha256_of(path: str | Path) -> str:
    """The hex SHA-256 of ``path``'s bytes. Raises OSError when it cannot be read."""
    path = Path(path)
    with _lock:
        job = _started.pop(_identity(path), None)
    if job is None:
        return _sha256(path)
    job.join()
    if job.error is not None:
        raise job.error
    # no digest: the thread never ran here (this process was forked from the one that started it)
    return job.digest if job.digest is not None else _sha256(path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb", buffering=0) as f:
        buffer = bytearray(min(_BLOCK, max(1, os.fstat(f.fileno()).st_size)))
        view = memoryview(buffer)
        while size := f.readinto(buffer):
            digest.update(view[:size])
    return digest.hexdigest()
