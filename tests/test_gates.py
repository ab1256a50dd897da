"""Quality gates that stay missed: a rejected artifact is set aside, --skip-unchanged judges the
gate again from the SQNRs an artifact records, and a missed gate's message stays short."""

from __future__ import annotations

import json
from pathlib import Path

from refq_cli.io.header import read_header
from tests.checkpoints import write
from tests.scripts import run_refq

SPEC = "version: 1\nmodules:\n  aux: {nonlinearity: relu}\n  context: {batch_first: true}\n"
WEIGHTS = 22  # quantized weights of tests.checkpoints' model, all between 45 and 50 dB
NAMES = ("model.refq.safetensors", "model.refq.report.json", "model.refq.report.md")
REJECTED = (
    "model.refq.rejected.safetensors",
    "model.refq.rejected.report.json",
    "model.refq.rejected.report.md",
)


def setup(tmp_path: Path) -> tuple[Path, Path]:
    (tmp_path / "q.yaml").write_text(SPEC)
    return write(tmp_path, "pt"), tmp_path / "q.yaml"


def outputs(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if ".refq." in p.name}


def gate_of(artifact: Path) -> dict:
    return json.loads(read_header(artifact)["refq.gate"])


def test_a_retried_red_convert_stays_red(tmp_path):
    source, q = setup(tmp_path)
    first = run_refq("convert", source, "-q", q, "--min-sqnr", "200")
    assert first.returncode == 1, first.stderr
    assert outputs(tmp_path) == set(REJECTED)  # nothing in the accepted place
    assert gate_of(tmp_path / REJECTED[0]) == {"min_sqnr": 200.0, "passed": False}
    report = json.loads((tmp_path / REJECTED[1]).read_text())
    assert report["gate"]["passed"] is False and len(report["gate"]["below"]) == WEIGHTS
    markdown = (tmp_path / REJECTED[2]).read_text()
    assert "Quality gate (minimum SQNR 200 dB): 22 weights below 200 dB" in markdown
    assert "model.refq.rejected.safetensors" in first.stderr
    retry = run_refq("convert", source, "-q", q, "--min-sqnr", "200", "--skip-unchanged")
    assert retry.returncode == 1 and "SKIPPED" not in retry.stdout
    assert retry.stdout.startswith("GATE")
    assert outputs(tmp_path) == set(REJECTED)
    plain = run_refq("convert", source, "-q", q, "--min-sqnr", "200")  # no --force needed
    assert plain.returncode == 1 and "quality gate" in plain.stderr


def test_a_retried_red_batch_stays_red(tmp_path):
    setup(tmp_path)
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        "version: 1\njobs:\n  - {input: model.pt, spec: q.yaml, out_dir: out, min_sqnr: 200}\n"
    )
    for extra in ((), ("--skip-unchanged",)):
        result = run_refq("batch", manifest, "--json", *extra)
        assert result.returncode == 1, result.stderr
        (job,) = json.loads(result.stdout)["jobs"]
        assert job["status"] == "gate"
        assert Path(job["output"]).name == REJECTED[0]
        assert outputs(tmp_path / "out") == set(REJECTED)


def test_the_gate_is_judged_again_from_the_recorded_sqnrs(tmp_path):
    source, q = setup(tmp_path)
    assert run_refq("convert", source, "-q", q, "--min-sqnr", "30").returncode == 0
    assert outputs(tmp_path) == set(NAMES)
    before = [(p.stat().st_ino, p.stat().st_mtime_ns) for p in map(tmp_path.joinpath, NAMES)]
    stricter = run_refq("convert", source, "-q", q, "--min-sqnr", "200", "--skip-unchanged")
    assert stricter.returncode == 1 and stricter.stdout.startswith("GATE"), stricter.stdout
    assert "22 weights below 200 dB" in stricter.stdout
    assert gate_of(tmp_path / NAMES[0]) == {"min_sqnr": 30.0, "passed": True}
    for gate in ("30", "10", None):  # equal, looser, none
        args = ("--min-sqnr", gate) if gate else ()
        again = run_refq("convert", source, "-q", q, "--skip-unchanged", *args)
        assert again.returncode == 0 and again.stdout.startswith("SKIPPED"), again.stdout
    after = [(p.stat().st_ino, p.stat().st_mtime_ns) for p in map(tmp_path.joinpath, NAMES)]
    assert after == before and outputs(tmp_path) == set(NAMES)  # never converted again


def test_a_rejected_artifact_put_in_place_is_never_up_to_date(tmp_path):
    source, q = setup(tmp_path)
    assert run_refq("convert", source, "-q", q, "--min-sqnr", "200").returncode == 1
    for rejected, accepted in zip(REJECTED, NAMES, strict=True):
        (tmp_path / rejected).rename(tmp_path / accepted)
    result = run_refq("convert", source, "-q", q, "--min-sqnr", "10", "--skip-unchanged")
    assert result.returncode == 0 and result.stdout.startswith("CONVERTED"), result.stdout
    assert gate_of(tmp_path / NAMES[0]) == {"min_sqnr": 10.0, "passed": True}


def test_the_same_gate_gives_the_same_bytes(tmp_path):
    source, q = setup(tmp_path)
    for name in ("a", "b"):
        args = ("-o", tmp_path / f"{name}.refq.safetensors", "--min-sqnr", "30")
        assert run_refq("convert", source, "-q", q, *args).returncode == 0
    assert (tmp_path / "a.refq.safetensors").read_bytes() == (
        tmp_path / "b.refq.safetensors"
    ).read_bytes()


def test_a_missed_gate_is_one_short_line_in_the_summary(tmp_path):
    source, q = setup(tmp_path)
    summary = tmp_path / "summary.md"
    args = ("--min-sqnr", "200", "--summary-md", summary, "--out-dir", tmp_path / "out")
    assert run_refq("convert", source, "-q", q, *args).returncode == 1
    (row,) = [line for line in summary.read_text().splitlines() if "| gate |" in line]
    error = row.split(" | ")[-1]
    assert len(error) < 200, error
    assert error.startswith(f"{WEIGHTS} weights below 200 dB: ")
    assert f"and {WEIGHTS - 3} more" in error and error.count(" dB)") == 3
    assert REJECTED[0] in row


def test_a_root_modules_weights_are_named_alike_by_every_gate(tmp_path):
    # Judged again from the artifact, a root module's weight was ".weight_ih_l0".
    import torch

    from refq_cli.pipeline.batch import run_jobs
    from refq_cli.pipeline.jobs import Job, Options

    torch.manual_seed(0)
    torch.save(torch.nn.LSTM(4, 3).state_dict(), tmp_path / "root.pt")
    (tmp_path / "q.yaml").write_text("version: 1\n")
    job = Job(
        tmp_path / "root.pt",
        tmp_path / "q.yaml",
        tmp_path / "root.refq.safetensors",
        tmp_path / "root.refq.report.json",
    )
    (first,) = run_jobs([job], Options())
    gated = Job(*[getattr(job, f) for f in ("input", "spec", "output", "report")], min_sqnr=200.0)
    (again,) = run_jobs([gated], Options(skip_unchanged=True))
    assert again.status == "gate" and first.status == "converted"
    names = {b["name"] for b in again.gate["below"]}
    assert "weight_ih_l0" in names and not any(n.startswith(".") for n in names)
