"""Input digests, computed in the background or on the spot."""

from __future__ import annotations

import hashlib
import os

import pytest

from refq_cli.io import digest


def test_a_started_digest_is_the_files_sha256(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(os.urandom(3 << 20))
    digest.start(path)
    digest.start(path)  # once is enough
    assert digest.sha256_of(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert digest._identity(path) not in digest._started  # handed over, not kept


def started_for(path):
    return [job for key, job in digest._started.items() if key[0] == os.path.realpath(path)]


def test_a_file_changed_after_start_is_hashed_again(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")
    digest.start(path)
    (job,) = started_for(path)
    job.join()  # the old contents are hashed before the file changes
    path.write_bytes(b"new contents")
    assert digest.sha256_of(path) == hashlib.sha256(b"new contents").hexdigest()
    assert started_for(path) == []  # the stale hash is dropped too


def test_a_discarded_hash_stops_and_is_forgotten(tmp_path, monkeypatch):
    path = tmp_path / "a.bin"
    path.write_bytes(b"x" * 100)
    monkeypatch.setattr(digest._Hashing, "start", lambda self: None)  # run by hand below
    digest.start(path)
    (job,) = started_for(path)
    digest.discard(path)
    assert started_for(path) == []
    job.run()
    assert job.digest is None and job.error is None  # stopped before its first block


def test_a_failed_conversion_job_leaves_no_hash_running(tmp_path, monkeypatch):
    import importlib
    import sys

    for name in (
        "refq_cli.pipeline.artifact",
        "refq_cli.pipeline.convert",
        "refq_cli.pipeline.report",
    ):
        importlib.import_module(name)  # now, so that the job imports no torch itself
    from refq_cli.errors import RefqError
    from refq_cli.pipeline.batch import Job, Options, convert_job

    source = tmp_path / "model.pt"
    source.write_bytes(b"x" * 100)
    output = tmp_path / "model.refq.safetensors"
    output.write_bytes(b"already here")
    monkeypatch.setattr(digest._Hashing, "start", lambda self: None)  # kept, not run
    # as in a fresh process, the job starts hashing first
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    job = Job(source, tmp_path / "q.yaml", output, tmp_path / "model.report.json")
    with pytest.raises(RefqError, match="exists"):
        convert_job(job, Options())  # fails on its output, before reading the input
    assert started_for(source) == []


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

    code = "import sys, refq_cli.io.digest; print('torch' in sys.modules)"
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
    monkeypatch.setattr(digest, "_sha256", lambda p, *a: time.sleep(1) or slow(p, *a))
    digest.start(path)  # still sleeping when the child is forked: the child has no such thread
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_digest, args=(path, queue))
    child.start()
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    assert queue.get(timeout=30) == expected
    child.join()
    assert digest.sha256_of(path) == expected  # and the parent's own thread finishes
