"""Every file refq writes goes through one output mechanism: never over an input, never over a
file without --force, through exclusive unpredictable temporaries, artifact and reports from
one run. Refusals are one line on stderr and exit 2; inputs keep their bytes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from refq_cli.cli.app import app
from refq_cli.errors import RefqError
from refq_cli.pipeline.batch import convert_job
from refq_cli.pipeline.jobs import Job, Options
from tests.checkpoints import write
from tests.scripts import run_refq

SPEC = "version: 1\nmodules:\n  aux: {nonlinearity: relu}\n  context: {batch_first: true}\n"
BUDGET = int(os.environ.get("REFQ_FUZZ_EXAMPLES", "300"))


def refused(result: subprocess.CompletedProcess, *words: str) -> str:
    """Assert a refusal: exit 2, one line on stderr (returned) holding ``words``."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert len(lines) == 1 and lines[0].startswith("refq: error: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def snapshot(*paths: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in paths}


def unchanged(before: dict[Path, bytes]) -> bool:
    return all(
        p.is_file() and not p.is_symlink() and p.read_bytes() == b for p, b in before.items()
    )


@pytest.fixture
def setup(tmp_path):
    """A checkpoint, a spec and a manifest that converts it into out/."""
    source = write(tmp_path, "pt")
    spec = tmp_path / "q.yaml"
    spec.write_text(SPEC)
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        "version: 1\ndefaults: {spec: q.yaml, out_dir: out}\njobs:\n  - input: model.pt\n"
    )
    return source, spec, manifest


# --- --summary-md ---------------------------------------------------------------------------


@pytest.mark.parametrize("victim", ["checkpoint", "spec", "manifest"])
def test_summary_md_never_replaces_an_input(setup, victim):
    source, spec, manifest = setup
    target = {"checkpoint": source, "spec": spec, "manifest": manifest}[victim]
    before = snapshot(source, spec, manifest)
    for force in ([], ["--force"]):
        result = run_refq("batch", manifest, "--summary-md", target, *force)
        refused(result, "--summary-md", "would overwrite")
        assert unchanged(before)
    assert not (source.parent / "out" / "model.refq.safetensors").exists()  # before any work


def test_summary_md_replaces_only_a_summary_without_force(setup, tmp_path):
    manifest = setup[2]
    other = tmp_path / "notes.md"
    other.write_text("my notes\n")
    refused(run_refq("batch", manifest, "--summary-md", other), "already exists", "--force")
    assert other.read_text() == "my notes\n"
    summary = tmp_path / "summary.md"
    assert run_refq("batch", manifest, "--summary-md", summary).returncode == 0
    result = run_refq("batch", manifest, "--skip-unchanged", "--summary-md", summary)
    assert result.returncode == 0, result.stderr  # a previous summary is replaced
    assert "1 skipped" in summary.read_text()
    assert run_refq("batch", manifest, "--force", "--summary-md", other).returncode == 0


# --- --skip-unchanged -------------------------------------------------------------------------


def test_skip_unchanged_never_replaces_another_jobs_input(tmp_path):
    write(tmp_path, "pt", seed=0).rename(tmp_path / "a.pt")
    b = write(tmp_path, "pt", seed=1).rename(tmp_path / "b.pt")
    (tmp_path / "q.yaml").write_text(SPEC)
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        "version: 1\ndefaults: {spec: q.yaml}\njobs:\n"
        "  - {input: a.pt, output: b.pt}\n  - {input: b.pt, output: b.refq.safetensors}\n"
    )
    before = snapshot(tmp_path / "a.pt", b)
    for flags in (["--skip-unchanged"], ["--skip-unchanged", "--force"], ["--force"]):
        refused(run_refq("batch", manifest, *flags), "b.pt", "would overwrite the input")
        assert unchanged(before)


def test_skip_unchanged_replaces_only_refqs_own_outdated_outputs(setup, tmp_path):
    source, spec, _ = setup
    artifact = tmp_path / "model.refq.safetensors"
    artifact.write_text("someone's file\n")
    result = run_refq("convert", source, "-q", spec, "--skip-unchanged")
    refused(result, "model.refq.safetensors", "already exists", "--force")
    assert artifact.read_text() == "someone's file\n"
    artifact.unlink()
    assert run_refq("convert", source, "-q", spec).returncode == 0
    spec.write_text(SPEC + "defaults: {dtype: quint8, qscheme: per_tensor_affine}\n")
    old = artifact.read_bytes()
    result = run_refq("convert", source, "-q", spec, "--skip-unchanged", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["totals"]["converted"] == 1
    assert artifact.read_bytes() != old  # refq's own out-of-date artifact is replaced
    (tmp_path / "model.refq.report.md").write_text("my own notes\n")  # not a refq report
    spec.write_text(SPEC)
    refused(run_refq("convert", source, "-q", spec, "--skip-unchanged"), "report.md")


# --- temporaries ------------------------------------------------------------------------------


def test_a_link_planted_at_the_temporary_name_is_not_written_through(tmp_path):
    from refq_cli.io.safetensors_writer import write_safetensors

    source = write(tmp_path, "pt")
    before = snapshot(source)
    target = tmp_path / "a.refq.safetensors"
    for name in (f".{target.name}.{os.getpid()}.tmp", f".{target.name}.{'0' * 16}.tmp"):
        (tmp_path / name).symlink_to(source)
    write_safetensors(target, {"w": torch.ones(3)}, {})
    assert unchanged(before)
    assert target.is_file() and not target.is_symlink()
    assert (tmp_path / f".{target.name}.{'0' * 16}.tmp").is_symlink()  # not ours: left alone


LIVE_WRITER = """
import os, sys
from pathlib import Path
import torch
from refq_cli.io import safetensors_writer

os.getpid = lambda: 4194305  # a PID from another namespace: no process here has it
real_copy = safetensors_writer._copy_data

def paused(source, target, size):
    print("writing", flush=True)
    sys.stdin.readline()
    real_copy(source, target, size)

safetensors_writer._copy_data = paused
safetensors_writer.write_safetensors(
    Path(sys.argv[1]), {"w": torch.full((3,), 7.0)}, {}, force=True
)
"""


def test_cleanup_never_removes_a_live_writers_temporary(tmp_path):
    from safetensors.torch import load_file

    from refq_cli.io.safetensors_writer import write_safetensors

    script = tmp_path / "writer.py"
    script.write_text(textwrap.dedent(LIVE_WRITER))
    target = tmp_path / "a.refq.safetensors"
    writer = subprocess.Popen(
        [sys.executable, str(script), str(target)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout.readline().strip() == "writing"
        write_safetensors(target, {"w": torch.zeros(3)}, {}, force=True)  # cleans up stale ones
        _, stderr = writer.communicate("go\n", timeout=60)
    finally:
        writer.kill()
    assert writer.returncode == 0, stderr
    assert torch.equal(load_file(target)["w"], torch.full((3,), 7.0))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# --- outputs of one run -----------------------------------------------------------------------


def test_two_jobs_writing_one_artifact_through_a_linked_folder_are_refused(tmp_path):
    write(tmp_path, "pt", seed=0).rename(tmp_path / "a.pt")
    (tmp_path / "b").mkdir()
    write(tmp_path / "b", "pt", seed=1).rename(tmp_path / "b" / "a.pt")
    (tmp_path / "q.yaml").write_text(SPEC)
    (tmp_path / "out").mkdir()
    (tmp_path / "alias").symlink_to("out")
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        "version: 1\ndefaults: {spec: q.yaml}\njobs:\n"
        "  - {input: a.pt, out_dir: out}\n  - {input: b/a.pt, out_dir: alias}\n"
    )
    for force in ([], ["--force"]):
        refused(run_refq("batch", manifest, *force), "the same file as")
        assert list((tmp_path / "out").iterdir()) == []


def test_outputs_that_share_a_report_are_refused(tmp_path):
    write(tmp_path, "pt", seed=0).rename(tmp_path / "a.pt")
    write(tmp_path, "pt", seed=1).rename(tmp_path / "b.pt")
    (tmp_path / "q.yaml").write_text(SPEC)
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        "version: 1\ndefaults: {spec: q.yaml}\njobs:\n"
        "  - {input: a.pt, output: x.refq}\n  - {input: b.pt, output: x.refq.safetensors}\n"
    )
    for force in ([], ["--force"]):
        line = refused(run_refq("batch", manifest, *force), "x.refq.report.json", "the same file")
        assert "a.pt" in line and "b.pt" in line
        assert not (tmp_path / "x.refq").exists()


def test_concurrent_forced_runs_leave_one_runs_artifact_and_reports(tmp_path, monkeypatch):
    """Run A pauses after writing its artifact; run B writes everything; A finishes. The
    artifact and both reports must all be one run's."""
    from refq_cli.io.header import read_header
    from refq_cli.pipeline import report as report_module

    spec = tmp_path / "q.yaml"
    spec.write_text(SPEC)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    inputs = [write(tmp_path / "a", "pt", seed=0), write(tmp_path / "b", "pt", seed=1)]
    out = tmp_path / "out.refq.safetensors"
    jobs = [Job(p, spec, out, tmp_path / "out.refq.report.json") for p in inputs]
    paused, go = threading.Event(), threading.Event()
    to_markdown = report_module.to_markdown

    def pausing(report):
        if threading.current_thread().name == "A":
            paused.set()
            go.wait(60)
        return to_markdown(report)

    monkeypatch.setattr(report_module, "to_markdown", pausing)
    errors = []

    def run_a():
        try:
            convert_job(jobs[0], Options(force=True))
        except RefqError as exc:
            errors.append(exc)

    a = threading.Thread(target=run_a, name="A")
    a.start()
    assert paused.wait(60)
    try:
        convert_job(jobs[1], Options(force=True))
    finally:
        go.set()
        a.join(60)
    assert not errors
    report = json.loads((tmp_path / "out.refq.report.json").read_text())
    assert report["source"]["sha256"] == json.loads(read_header(out)["refq.source"])["sha256"]
    assert (tmp_path / "out.refq.report.md").read_text() == to_markdown(report)


# --- failures are one line ------------------------------------------------------------------


READ_ONLY = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"'


def run_with_read_only(folder: Path, *args: object) -> subprocess.CompletedProcess:
    """``refq ARGS`` with ``folder`` read-only: by its mode, or for root (whom modes do not
    stop) by a read-only bind mount in a mount namespace of its own."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            return run_refq(*args)
        finally:
            folder.chmod(0o755)
    command = ["unshare", "-m", "sh", "-c", READ_ONLY, "sh", str(folder)]
    if shutil.which("unshare") is None or subprocess.run([*command, "true"]).returncode:
        pytest.skip("cannot make a read-only folder here")
    refq = Path(sys.executable).with_name("refq")
    return subprocess.run([*command, refq, *map(str, args)], capture_output=True, text=True)


def test_a_read_only_report_folder_is_one_line_naming_it(setup, tmp_path):
    source, spec, _ = setup
    (tmp_path / "out").mkdir()
    (tmp_path / "reports").mkdir()
    output = tmp_path / "out" / "a.refq.safetensors"
    report = tmp_path / "reports" / "r.json"
    result = run_with_read_only(
        tmp_path / "reports", "convert", source, "-q", spec, "-o", output, "--report", report
    )
    line = refused(result, str(tmp_path / "reports"))
    assert "not writable" in line or "Read-only" in line or "Permission denied" in line
    assert list((tmp_path / "out").iterdir()) == []  # not an artifact without its reports


def test_a_failing_report_write_is_one_error_and_leaves_nothing(tmp_path, monkeypatch):
    from refq_cli.pipeline import report as report_module

    source = write(tmp_path, "pt")
    (tmp_path / "q.yaml").write_text(SPEC)
    out = tmp_path / "out"
    out.mkdir()
    job = Job(source, tmp_path / "q.yaml", out / "a.refq.safetensors", out / "a.report.json")

    def failing(report):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(report_module, "to_markdown", failing)
    with pytest.raises(PermissionError):
        convert_job(job, Options())
    assert list(out.iterdir()) == []  # not the artifact and reports of half a run


# --- the header limit -------------------------------------------------------------------------


def test_a_header_refq_could_not_read_back_is_refused_before_writing(tmp_path):
    from refq_cli.io.safetensors_writer import SafetensorsWriter
    from refq_cli.pipeline.artifact import ArtifactError

    target = tmp_path / "big.refq.safetensors"
    with pytest.raises(ArtifactError, match="header") as caught, SafetensorsWriter(target) as w:
        for i in range(150_000):
            w.begin(f"{i:07d}." + "x" * 700, torch.float32, (0,))
            w.end()
        w.finish({})
    assert "\n" not in str(caught.value) and "100,000,000" in str(caught.value)
    assert list(tmp_path.iterdir()) == []


def test_the_header_check_before_the_work_is_cheap(tmp_path):
    from refq_cli.io.header import MAX_HEADER_BYTES
    from refq_cli.io.safetensors_writer import check_header_fits, write_safetensors
    from refq_cli.pipeline.artifact import ArtifactError

    names = (f"{i:07d}." + "x" * 700 for i in range(150_000))
    with pytest.raises(ArtifactError, match="shorter names"):
        check_header_fits(names, path=tmp_path / "a")
    check_header_fits(["a", "b"], 1000)
    with pytest.raises(ArtifactError):
        check_header_fits(["a"], MAX_HEADER_BYTES)
    with pytest.raises(ArtifactError, match="header"):
        write_safetensors(tmp_path / "m", {"w": torch.zeros(1)}, {"k": "v" * MAX_HEADER_BYTES})
    assert list(tmp_path.iterdir()) == []


# --- hostile paths ----------------------------------------------------------------------------


def test_special_files_as_outputs(setup, tmp_path):
    source, spec, manifest = setup
    before = snapshot(source, spec, manifest)
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    refused(run_refq("convert", source, "-q", spec, "-o", fifo, "--force"), "not a regular file")
    refused(run_refq("convert", source, "-q", spec, "-o", "/dev/stdout", "--force"), "/dev/stdout")
    refused(run_refq("convert", source, "-q", spec, "-o", "/dev/null", "--force"), "/dev/null")
    refused(run_refq("init-config", source, "-o", "/dev/stdout", "--force"), "/dev/stdout")
    dangling = tmp_path / "dangling.safetensors"
    dangling.symlink_to(tmp_path / "nowhere")
    refused(run_refq("convert", source, "-q", spec, "-o", dangling, "--force"), "symbolic link")
    assert not (tmp_path / "nowhere").exists()
    hard = tmp_path / "hard.json"
    os.link(source, hard)
    refused(run_refq("convert", source, "-q", spec, "--report", hard, "--force"), "the input")
    (tmp_path / "m2.yaml").write_text(
        "version: 1\njobs:\n  - {input: model.pt, spec: q.yaml, output: m2.yaml}\n"
    )
    before[tmp_path / "m2.yaml"] = (tmp_path / "m2.yaml").read_bytes()
    refused(run_refq("batch", tmp_path / "m2.yaml", "--force"), "manifest")
    assert unchanged(before)


def test_init_config_output_is_checked_before_reading_the_checkpoint(setup, tmp_path):
    source, spec, _ = setup
    before = snapshot(source, spec)
    refused(run_refq("init-config", source, "-o", spec), "already exists")
    refused(run_refq("init-config", source, "-o", source, "--force"), "would overwrite the input")
    (tmp_path / "link").symlink_to(tmp_path)
    refused(run_refq("init-config", source, "-o", tmp_path / "link" / "model.pt", "--force"))
    assert unchanged(before)
    assert run_refq("init-config", source, "-o", tmp_path / "s.yaml").returncode == 0


def test_an_output_replaced_by_a_link_meanwhile_is_not_written(tmp_path, monkeypatch):
    from refq_cli.pipeline import report as report_module

    source = write(tmp_path, "pt")
    before = snapshot(source)
    (tmp_path / "q.yaml").write_text(SPEC)
    job = Job(source, tmp_path / "q.yaml", tmp_path / "a.st", tmp_path / "a.report.json")
    to_markdown = report_module.to_markdown

    def planting(report):
        (tmp_path / "a.report.json").symlink_to(source)
        return to_markdown(report)

    monkeypatch.setattr(report_module, "to_markdown", planting)
    with pytest.raises(RefqError, match=r"a\.report\.json"):
        convert_job(job, Options(force=True))
    assert unchanged(before) and not (tmp_path / "a.st").exists()


# --- the fuzzer -------------------------------------------------------------------------------

KINDS = [
    "input",
    "spec",
    "manifest",
    "link to input",
    "in a linked folder",
    "new",
    "new 2",
    "unrelated",
    "same as --output",
    "dangling",
    "directory",
]


def _place(base: Path, kind: str) -> str:
    """A path (relative to ``base``) of the given kind."""
    return {
        "input": "model.pt",
        "spec": "q.yaml",
        "manifest": "m.yaml",
        "link to input": "link.pt",
        "in a linked folder": "linked/model.pt",
        "new": "new.refq.safetensors",
        "new 2": "sub/new2.json",
        "unrelated": "unrelated.txt",
        "same as --output": "SAME",
        "dangling": "dangling",
        "directory": "sub",
    }[kind]


def _tiny_world(base: Path) -> None:
    """A tiny GRUCell checkpoint, its spec and manifest, and every kind of path beside them."""
    torch.manual_seed(0)
    cell = torch.nn.GRUCell(2, 2)
    torch.save({f"cell.{k}": v for k, v in cell.state_dict().items()}, base / "model.pt")
    (base / "q.yaml").write_text("version: 1\n")
    (base / "unrelated.txt").write_text("unrelated\n")
    (base / "link.pt").symlink_to(base / "model.pt")
    (base / "linked").symlink_to(base)
    (base / "dangling").symlink_to(base / "missing")
    (base / "sub").mkdir()


FUZZ = settings(
    max_examples=BUDGET,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest.mark.slow
@FUZZ
@given(
    command=st.sampled_from(["convert", "convert --out-dir", "init-config", "batch"]),
    output=st.sampled_from([k for k in KINDS if k != "same as --output"]),
    report=st.sampled_from([None, *KINDS]),
    summary=st.sampled_from([None, *KINDS]),
    flags=st.lists(st.sampled_from(["--force", "--skip-unchanged"]), unique=True),
)
def test_no_path_flag_ever_changes_an_input(
    tmp_path_factory, monkeypatch, command, output, report, summary, flags
):
    base = tmp_path_factory.mktemp("world")
    _tiny_world(base)
    monkeypatch.chdir(base)
    out = _place(base, output)
    if command == "batch":
        Path("m.yaml").write_text(
            f"version: 1\njobs:\n  - {{input: model.pt, spec: q.yaml, output: {json.dumps(out)}}}\n"
        )
        args = ["batch", "m.yaml"]
    else:
        Path("m.yaml").write_text("version: 1\n")
        if command == "init-config":
            args = ["init-config", "model.pt", "-o", out]
        elif command == "convert --out-dir":
            args = ["convert", "model.pt", "-q", "q.yaml", "--out-dir", out]
        else:
            args = ["convert", "model.pt", "-q", "q.yaml", "-o", out]
            if report is not None:
                args += ["--report", out if report == "same as --output" else _place(base, report)]
    if summary is not None and command != "init-config":
        args += ["--summary-md", out if summary == "same as --output" else _place(base, summary)]
    args += [f for f in flags if command != "init-config" or f == "--force"]
    inputs = {"batch": ["m.yaml", "q.yaml"], "init-config": []}.get(command, ["q.yaml"])
    if "--force" not in flags:  # without it, nothing that exists changes
        inputs = ["m.yaml", "q.yaml", "unrelated.txt"]
    before = snapshot(base / "model.pt", *(base / name for name in inputs))
    result = CliRunner().invoke(app, args)
    event(f"{command}: exit {result.exit_code}")
    assert result.exit_code in (0, 2), (args, result.output)
    if result.exit_code == 2:
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("refq: error: "), (args, result.stderr)
    assert unchanged(before), args
    assert (base / "link.pt").resolve() == base / "model.pt"
    assert [p for p in base.rglob(".*.tmp")] == []


def test_inputs_named_like_stale_temporaries_are_not_removed(tmp_path):
    """The cleanup of temporaries a killed run left must never take an input for one."""
    source = tmp_path / ".a.refq.safetensors.0123456789abcdef.tmp"
    source.write_bytes(write(tmp_path, "pt").read_bytes())
    spec = tmp_path / ".a.refq.report.json.fedcba9876543210.tmp"
    spec.write_text("version: 1\n")
    before = snapshot(source, spec)
    result = run_refq("convert", source, "-q", spec, "-o", tmp_path / "a.refq.safetensors")
    assert result.returncode == 0, result.stderr
    assert unchanged(before)
