"""Faults around writing: same-file outputs, failures with --force, SIGKILL, a full disk."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from refq_cli.errors import RefqError
from refq_cli.io import safetensors_writer
from refq_cli.pipeline.batch import convert_job
from refq_cli.pipeline.jobs import Job, Options
from tests.checkpoints import write
from tests.scripts import run_refq


def spec(tmp_path, text="version: 1\n"):
    path = tmp_path / "q.yaml"
    path.write_text(text)
    return path


def job(tmp_path, source, spec_path):
    out = tmp_path / "out.refq.safetensors"
    return Job(source, spec_path, out, out.with_name("out.refq.report.json"))


@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_output_equal_to_the_input_through_a_link_is_refused(tmp_path, link):
    source = write(tmp_path, "pt")
    original = source.read_bytes()
    alias = tmp_path / "alias.safetensors"
    alias.symlink_to(source) if link == "symlink" else os.link(source, alias)
    result = run_refq("convert", source, "-q", spec(tmp_path), "-o", alias, "--force")
    assert result.returncode == 2 and "would overwrite the input" in result.stderr
    assert source.read_bytes() == original


def test_with_force_the_old_artifact_survives_a_failed_conversion(tmp_path):
    source = write(tmp_path, "pt")
    good = job(tmp_path, source, spec(tmp_path))
    convert_job(good, Options())
    before = good.output.read_bytes()
    bad_spec = tmp_path / "bad.yaml"
    bad_spec.write_text(
        "version: 1\nrules:\n  - {match: gate, observer: fixed, scale: [0.1, 0.2]}\n"
    )
    with pytest.raises(RefqError, match="per-channel scale has 2 entries"):
        convert_job(Job(source, bad_spec, good.output, good.report), Options(force=True))
    assert good.output.read_bytes() == before


class FullDisk:
    """A temporary file on a full disk."""

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def close(self):
        pass


def full_disk_while_streaming(monkeypatch):
    monkeypatch.setattr(safetensors_writer.tempfile, "TemporaryFile", lambda **kwargs: FullDisk())


def full_disk_while_finishing(monkeypatch):
    def copy(source, target, size):
        target.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(safetensors_writer, "_copy_data", copy)


@pytest.mark.parametrize("fault", [full_disk_while_streaming, full_disk_while_finishing])
def test_a_full_disk_leaves_the_old_file_and_no_partial_one(tmp_path, monkeypatch, fault):
    source = write(tmp_path, "pt")
    target = job(tmp_path, source, spec(tmp_path))
    convert_job(target, Options())
    before = target.output.read_bytes()
    fault(monkeypatch)
    with pytest.raises(RefqError, match="cannot write: No space left on device"):
        convert_job(target, Options(force=True))
    assert target.output.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


KILLED_WRITER = """
import sys, time
from pathlib import Path
import torch
from refq_cli.io import safetensors_writer

def slow(source, target, size):
    target.write(b"x" * 1_000_000)
    target.flush()
    print("writing", flush=True)
    time.sleep(60)

safetensors_writer._copy_data = slow
safetensors_writer.write_safetensors(Path(sys.argv[1]), {"w": torch.zeros(3)}, {}, force=True)
"""


def kill_mid_write(tmp_path: Path, target: Path) -> None:
    """Start a writer of ``target``, SIGKILL it once its temporary file exists."""
    script = tmp_path / "writer.py"
    script.write_text(textwrap.dedent(KILLED_WRITER))
    writer = subprocess.Popen(
        [sys.executable, str(script), str(target)], stdout=subprocess.PIPE, text=True
    )
    assert writer.stdout.readline().strip() == "writing"
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()


def test_sigkill_mid_write_leaves_the_old_file_and_the_next_run_cleans_up(tmp_path):
    target = tmp_path / "a.refq.safetensors"
    safetensors_writer.write_safetensors(target, {"w": torch.ones(2)}, {})
    before = target.read_bytes()
    kill_mid_write(tmp_path, target)
    assert target.read_bytes() == before  # the old file, never a partial one
    stale = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(stale) == 1  # what the killed process left
    safetensors_writer.write_safetensors(target, {"w": torch.zeros(2)}, {}, force=True)
    assert [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    assert target.read_bytes() != before


def test_a_target_that_never_existed_stays_absent_after_a_kill(tmp_path):
    target = tmp_path / "new.refq.safetensors"
    kill_mid_write(tmp_path, target)
    assert not target.exists()
