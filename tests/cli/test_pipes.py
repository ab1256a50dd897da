"""``refq`` writing into a pipe whose reader went away (``refq schema | head -1``).

The output is lost, quietly: the command still does its work and exits with its own code. Each
test runs the entry point in a subprocess, as a shell pipeline would, with the pipe's read end
closed before refq writes (or after it read a little).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "models"
CONVERT = ("convert", EXAMPLES / "example.pt", "--qconfig", EXAMPLES / "example.yaml")
NOISE = ("BrokenPipe", "Traceback", "Exception ignored", "internal error")


def refq(*args: object) -> list[str]:
    return [sys.executable, "-m", "refq_cli", *map(str, args)]


def env(**extra: str) -> dict[str, str]:
    """The environment without REFQ_DEBUG and PYTHONUNBUFFERED, as users run refq: stdout
    block-buffered, so that some output is still in its buffer when Python exits."""
    drop = ("REFQ_DEBUG", "PYTHONUNBUFFERED")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, **extra}


def into_closed_pipe(
    *args: object, stderr_too: bool = False, cwd: Path | None = None, **environ: str
) -> tuple[int, str]:
    """Run ``refq ARGS`` with stdout (and stderr with ``stderr_too``) a pipe nobody reads;
    return the exit code and what went to stderr (empty with ``stderr_too``)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        child = subprocess.Popen(
            refq(*args),
            stdout=write_end,
            stderr=write_end if stderr_too else subprocess.PIPE,
            text=True,
            env=env(**environ),
            cwd=cwd,
        )
    finally:
        os.close(write_end)
    _, stderr = child.communicate(timeout=300)
    return child.returncode, stderr or ""


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("artifact") / "a.refq.safetensors"
    result = subprocess.run(refq(*CONVERT, "-o", path), capture_output=True, text=True, env=env())
    assert path.exists(), result.stderr
    return path


@pytest.mark.parametrize("unbuffered", ["", "1"], ids=["buffered", "unbuffered"])
def test_schema_into_a_closed_pipe_is_quiet(unbuffered):
    assert into_closed_pipe("schema", PYTHONUNBUFFERED=unbuffered) == (0, "")


def test_inspect_into_a_closed_pipe_is_quiet(artifact):
    assert into_closed_pipe("inspect", artifact) == (0, "")


def test_a_conversion_into_a_closed_pipe_still_writes_its_files(tmp_path):
    code, stderr = into_closed_pipe(*CONVERT, "-o", tmp_path / "a.refq.safetensors")
    assert (code, stderr) == (0, "")
    assert (tmp_path / "a.refq.safetensors").exists()
    assert (tmp_path / "a.refq.report.json").exists()


def test_a_batch_into_a_closed_pipe_converts_every_job(tmp_path):
    """Several checkpoints: the batch runner, printing a line per job."""
    for name in ("one", "two"):
        shutil.copy(EXAMPLES / "example.pt", tmp_path / f"{name}.pt")
    code, stderr = into_closed_pipe(
        "convert",
        "one.pt",
        "two.pt",
        "--qconfig",
        EXAMPLES / "example.yaml",
        "--out-dir",
        "out",
        cwd=tmp_path,
    )
    assert (code, stderr) == (0, "")
    assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors")) == [
        "one.refq.safetensors",
        "two.refq.safetensors",
    ]


def test_a_missed_gate_into_a_closed_pipe_still_fails_with_its_error(tmp_path):
    code, stderr = into_closed_pipe(
        *CONVERT, "-o", tmp_path / "a.refq.safetensors", "--min-sqnr", "1000", "--json"
    )
    assert code == 1, stderr
    assert "refq: error: quality gate" in stderr
    assert not any(noise in stderr for noise in NOISE), stderr
    assert (tmp_path / "a.refq.rejected.safetensors").exists()


def test_bad_input_with_stdout_and_stderr_closed_still_exits_2(tmp_path):
    assert into_closed_pipe("inspect", tmp_path / "nonexistent", stderr_too=True) == (2, "")


@pytest.mark.parametrize(
    "args", [["schema"], ["inspect", "--json", "--channels"]], ids=["schema", "inspect-json"]
)
def test_a_reader_that_stops_early_is_quiet(artifact, args):
    fcntl = pytest.importorskip("fcntl")
    if not hasattr(fcntl, "F_SETPIPE_SZ"):
        pytest.skip("no F_SETPIPE_SZ: cannot make the pipe small enough to fill")
    if args[0] == "inspect":
        args = [*args, artifact]
    read_end, write_end = os.pipe()
    # One page of pipe: refq's output (several kB) cannot all fit, so refq is still writing
    # when the reader leaves.
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)
    try:
        child = subprocess.Popen(refq(*args), stdout=write_end, stderr=subprocess.PIPE, env=env())
    finally:
        os.close(write_end)
    try:
        assert os.read(read_end, 100)
    finally:
        os.close(read_end)
    _, stderr = child.communicate(timeout=300)
    assert (child.returncode, stderr.decode()) == (0, "")
