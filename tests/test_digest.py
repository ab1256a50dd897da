"""Input digests, computed in the background or on the spot."""

from __future__ import annotations

import hashlib
import os
import threading
import time

import pytest

from refq_cli.io import digest

REAL_SHA256 = hashlib.sha256


def sha256(data):
    return REAL_SHA256(data).hexdigest()


class Hashes:
    """Every SHA-256 computed while a test runs, seen through hashlib's public constructor:
    the thread that computes each one and its digest (None until it is finished). With
    ``hold``, hashes begun in other threads wait until :meth:`release`."""

    def __init__(self, monkeypatch, hold=False):
        self.made = []
        self.gate = threading.Event()
        if not hold:
            self.gate.set()
        hashes = self

        class Recording:
            def __init__(self, *args):
                self.hash = REAL_SHA256(*args)
                self.thread = threading.current_thread()
                self.digest = None
                hashes.made.append(self)
                if self.thread is not threading.main_thread():
                    assert hashes.gate.wait(30)

            def update(self, data):
                self.hash.update(data)

            def hexdigest(self):
                self.digest = self.hash.hexdigest()
                return self.digest

        monkeypatch.setattr(hashlib, "sha256", Recording)

    def wait(self, count):
        """The first ``count`` hashes, once that many have begun."""
        deadline = time.monotonic() + 10
        while len(self.made) < count:
            assert time.monotonic() < deadline, f"{len(self.made)} of {count} hashes began"
            time.sleep(0.001)
        return self.made[:count]

    def release(self):
        self.gate.set()


def in_background(recording):
    return recording.thread is not threading.main_thread()


def test_a_started_digest_is_the_files_sha256(tmp_path, monkeypatch):
    path = tmp_path / "a.bin"
    path.write_bytes(os.urandom(3 << 20))
    expected = sha256(path.read_bytes())
    hashes = Hashes(monkeypatch)
    digest.start(path)
    digest.start(path)  # once is enough
    assert digest.sha256_of(path) == expected
    (started,) = hashes.made  # the background hash, handed to sha256_of
    assert in_background(started) and started.digest == expected
    # handed over, not kept: asked again, the digest is computed again, here
    assert digest.sha256_of(path) == expected
    assert len(hashes.made) == 2 and not in_background(hashes.made[1])


def test_a_file_changed_after_start_is_hashed_again(tmp_path, monkeypatch):
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")
    hashes = Hashes(monkeypatch)
    digest.start(path)
    (old,) = hashes.wait(1)
    old.thread.join()  # the old contents are hashed before the file changes
    assert old.digest == sha256(b"old")
    path.write_bytes(b"new contents")
    assert digest.sha256_of(path) == sha256(b"new contents")
    assert len(hashes.made) == 2 and hashes.made[1].digest == sha256(b"new contents")


def test_a_stale_hash_still_running_is_stopped(tmp_path, monkeypatch):
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")
    hashes = Hashes(monkeypatch, hold=True)
    digest.start(path)
    (stale,) = hashes.wait(1)
    replacement = tmp_path / "b.bin"
    replacement.write_bytes(b"new contents")
    os.replace(replacement, path)  # another file at the path while the old one is being hashed
    assert digest.sha256_of(path) == sha256(b"new contents")  # hashed here, not waited for
    hashes.release()
    stale.thread.join(30)
    assert not stale.thread.is_alive() and stale.digest is None  # stopped, never finished


def test_a_discarded_hash_stops_and_is_forgotten(tmp_path, monkeypatch):
    path = tmp_path / "a.bin"
    path.write_bytes(b"x" * 100)
    hashes = Hashes(monkeypatch, hold=True)
    digest.start(path)
    (first,) = hashes.wait(1)
    digest.discard(path)
    hashes.release()
    first.thread.join(30)
    assert first.digest is None  # stopped before its first block
    digest.start(path)  # forgotten: the same file starts a new hash
    second = hashes.wait(2)[1]
    assert in_background(second)
    assert digest.sha256_of(path) == sha256(b"x" * 100)
    assert second.digest == sha256(b"x" * 100) and len(hashes.made) == 2


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
    from refq_cli.pipeline.batch import convert_job
    from refq_cli.pipeline.jobs import Job, Options

    source = tmp_path / "model.pt"
    source.write_bytes(b"x" * 100)
    output = tmp_path / "model.refq.safetensors"
    output.write_bytes(b"already here")
    hashes = Hashes(monkeypatch, hold=True)
    # as in a fresh process, the job starts hashing first
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    spec = tmp_path / "q.yaml"
    spec.write_text("version: 1\n")
    job = Job(source, spec, output, tmp_path / "model.report.json")
    with pytest.raises(RefqError, match="exists"):
        convert_job(job, Options())  # fails on its output, before reading the input
    (started,) = hashes.wait(1)
    assert in_background(started)
    hashes.release()
    started.thread.join(30)
    assert not started.thread.is_alive() and started.digest is None  # stopped
    digest.start(source)  # and forgotten: the file is hashed anew
    assert in_background(hashes.wait(2)[1])
    assert digest.sha256_of(source) == sha256(b"x" * 100)


def test_unreadable_paths_raise_when_the_digest_is_asked_for(tmp_path):
    digest.start(tmp_path / "missing")  # nothing to start: no error yet
    with pytest.raises(FileNotFoundError):
        digest.sha256_of(tmp_path / "missing")
    digest.start(tmp_path)  # a directory is not hashed in the background: no error yet
    with pytest.raises(IsADirectoryError):
        digest.sha256_of(tmp_path)  # it is refused here


def test_digest_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, refq_cli.io.digest; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# In a fresh Python: convert the example, through the CLI or the library, and print the
# threads that were running when torch was first asked for.
_THREADS_AT_TORCH = """
import json, sys, threading

class Watch:
    threads = None

    def find_spec(self, name, path=None, target=None):
        if name == "torch" and Watch.threads is None:
            Watch.threads = [t.name for t in threading.enumerate()]
        return None

sys.meta_path.insert(0, Watch())
how, checkpoint, spec, out = sys.argv[1:]
if how == "cli":
    from refq_cli.cli.app import main

    sys.argv = ["refq", "convert", checkpoint, "-q", spec, "-o", out, "--quiet"]
    try:
        main()
    except SystemExit as exc:
        assert exc.code == 0, exc.code
else:
    import refq_cli

    refq_cli.convert(checkpoint, spec, out)
print(json.dumps(Watch.threads))
"""


@pytest.mark.parametrize("how", ["cli", "library"])
def test_a_conversion_hashes_its_input_while_torch_imports(tmp_path, how):
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    checkpoint = root / "examples" / "models" / "example.pt"
    spec = root / "configs" / "int8-per-channel-symmetric.yaml"
    out = tmp_path / "m.refq.safetensors"
    command = [sys.executable, "-c", _THREADS_AT_TORCH, how, str(checkpoint), str(spec), str(out)]
    result = subprocess.run(command, capture_output=True, text=True, check=False, cwd=root)
    assert result.returncode == 0, result.stderr
    threads = json.loads(result.stdout.splitlines()[-1])
    assert threads is not None, "torch was never imported"
    assert f"sha256 {checkpoint}" in threads, threads
    assert out.is_file()


def _child_digest(path, queue):
    queue.put(digest.sha256_of(path))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_digest_started_before_a_fork_is_computed_in_the_child(tmp_path, monkeypatch):
    import multiprocessing

    path = tmp_path / "a.bin"
    path.write_bytes(b"x" * (1 << 20))
    expected = sha256(path.read_bytes())
    hashes = Hashes(monkeypatch, hold=True)
    digest.start(path)
    (started,) = hashes.wait(1)  # held when the child is forked: the child has no such thread
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_digest, args=(path, queue))
    child.start()
    assert queue.get(timeout=30) == expected
    child.join()
    assert child.exitcode == 0 and started.digest is None  # the parent's hash is still held
    hashes.release()
    assert digest.sha256_of(path) == expected  # and the parent's own thread finishes
    assert started.digest == expected and len(hashes.made) == 1
