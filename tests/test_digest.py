"""Input digests, computed in the background or on the spot."""

from __future__ import annotations

import hashlib
import os

import pytest

from refq_cli import digest


def test_a_started_digest_is_the_files_sha256(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(os.urandom(3 << 20))
    digest.start(path)
    digest.start(path)  # once is enough
    assert digest.sha256_of(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert digest._identity(path) not in digest._started  # handed over, not kept


def test_a_file_changed_after_start_is_hashed_again(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")
    digest.start(path)
    path.write_bytes(b"new contents")
    assert digest.sha256_of(path) == hashlib.sha256(b"new contents").hexdigest()


def test_unreadable_paths_raise_when_the_digest_is_asked_for(tmp_path):
    digest.start(tmp_path / "missing")  # nothing to start: no error yet
    with pytest.raises(FileNotFoundError):
        digest.sha256_of(tmp_path / "missing")
    with pytest.raises(IsADirectoryError):
        digest.start(tmp_path)  # a directory starts a thread that fails...
        digest.sha256_of(tmp_path)  # ...and its error comes back here


def test_digest_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, refq_cli.digest; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _child_digest(path, queue):
    queue.put(digest.sha256_of(path))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_digest_started_before_a_fork_is_computed_in_the_child(tmp_path, monkeypatch):
    import multiprocessing
    import time

    path = tmp_path / "a.bin"
    path.write_bytes(b"x" * (1 << 20))
    slow = digest._sha256
    monkeypatch.setattr(digest, "_sha256", lambda p: time.sleep(1) or slow(p))
    digest.start(path)  # still sleeping when the child is forked: the child has no such thread
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_digest, args=(path, queue))
    child.start()
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    assert queue.get(timeout=30) == expected
    child.join()
    assert digest.sha256_of(path) == expected  # and the parent's own thread finishes
