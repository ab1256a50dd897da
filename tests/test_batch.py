"""Batch conversion: skipping unchanged outputs, running jobs (manifests: test_manifest,
shards: test_shards)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from refq_cli.errors import RefqError
from refq_cli.pipeline.batch import prepare_run, run_jobs
from refq_cli.pipeline.jobs import Job, Options, output_paths
from refq_cli.pipeline.shards import parse_shard
from refq_cli.pipeline.uptodate import is_unchanged
from tests.checkpoints import write


def make_jobs(tmp_path, count=3, spec_text="version: 1\nmodules:\n  aux: {nonlinearity: relu}\n"):
    spec = tmp_path / "q.yaml"
    spec.write_text(spec_text)
    jobs = []
    for i in range(count):
        folder = tmp_path / f"src{i}"
        folder.mkdir(exist_ok=True)
        source = write(folder, "pt", seed=i)
        out = tmp_path / "out"
        out.mkdir(exist_ok=True)
        jobs.append(Job(source, spec, out / f"m{i}.refq.safetensors", out / f"m{i}.report.json"))
    return jobs


def test_skip_unchanged_skips_only_what_is_up_to_date(tmp_path):
    jobs = make_jobs(tmp_path, 2)
    assert [r.status for r in run_jobs(jobs, Options())] == ["converted", "converted"]
    assert all(is_unchanged(j) for j in jobs)
    before = jobs[0].output.stat().st_mtime_ns
    results = run_jobs(jobs, Options(skip_unchanged=True))
    assert [r.status for r in results] == ["skipped", "skipped"]
    assert jobs[0].output.stat().st_mtime_ns == before
    jobs[0].spec.write_text(
        "version: 1\ndefaults: {dtype: quint8, qscheme: per_tensor_affine}\n"
        "modules:\n  aux: {nonlinearity: relu}\n"
    )
    assert not is_unchanged(jobs[0])
    assert [r.status for r in run_jobs(jobs, Options(skip_unchanged=True))] == [
        "converted",
        "converted",
    ]  # a changed spec changes every job that uses it
    write(jobs[1].input.parent, "pt", seed=99)  # a changed input
    assert not is_unchanged(jobs[1]) and is_unchanged(jobs[0])


def test_failures_in_the_middle_do_not_stop_the_others(tmp_path):
    jobs = make_jobs(tmp_path, 4)
    jobs[1].input.write_bytes(jobs[1].input.read_bytes()[:200])  # truncated checkpoint
    bad_spec = tmp_path / "bad.yaml"
    bad_spec.write_text("version: 1\ndefaults: {dtype: qint16}\n")
    jobs[2] = Job(jobs[2].input, bad_spec, jobs[2].output, jobs[2].report)
    results = run_jobs(jobs, Options())
    assert [r.status for r in results] == ["converted", "failed", "failed", "converted"]
    assert "cannot read the checkpoint" in results[1].error
    assert "bad.yaml:2:19" in results[2].error
    assert not jobs[1].output.exists() and jobs[3].output.exists()
    assert results[0].worst_sqnr_db > 30 and results[0].seconds > 0


def test_fail_fast_reports_the_jobs_it_did_not_run(tmp_path):
    jobs = make_jobs(tmp_path, 3)
    jobs[0].input.write_bytes(b"")
    results = run_jobs(jobs, Options(), fail_fast=True)
    assert [r.status for r in results] == ["failed", "not_run", "not_run"]


def test_fail_fast_with_workers_reports_every_job(tmp_path):
    # Futures cancelled after the failure once came out of as_completed and raised
    # CancelledError: the run crashed with no report at all.
    jobs = make_jobs(tmp_path, 12)
    jobs[0].input.write_bytes(b"")  # fails at once, while the other worker converts
    results = run_jobs(jobs, Options(), workers=2, fail_fast=True)
    assert [r.input for r in results] == [str(j.input) for j in jobs]
    assert results[0].status == "failed"
    assert {r.status for r in results[1:]} <= {"converted", "not_run"}
    # One job per worker is handed out at a time: after the failure, only the job already in
    # flight (two, if it ended first) may still convert; once, nearly all of them did.
    assert [r.status for r in results].count("converted") <= 2


def test_run_jobs_makes_the_output_folders(tmp_path):
    (job,) = make_jobs(tmp_path, 1)
    job = Job(
        job.input, job.spec, tmp_path / "new" / "a.refq.safetensors", tmp_path / "r" / "a.json"
    )
    assert [r.status for r in run_jobs([job], Options())] == ["converted"]
    assert job.output.exists() and job.report.exists()


def test_gates_fail_the_job_after_writing_it(tmp_path):
    jobs = [
        Job(j.input, j.spec, j.output, j.report, min_sqnr=200.0) for j in make_jobs(tmp_path, 1)
    ]
    (result,) = run_jobs(jobs, Options())
    assert result.status == "gate" and result.exit_code == 1 and "below 200 dB" in (result.error)
    aside = jobs[0].output.with_name("m0.refq.rejected.safetensors")
    assert result.output == str(aside) and aside.exists() and not jobs[0].output.exists()
    assert aside.with_name("m0.report.rejected.json").exists()


def test_worker_processes_give_the_same_artifacts(tmp_path):
    jobs = make_jobs(tmp_path, 3)
    run_jobs(jobs, Options())
    serial = [j.output.read_bytes() for j in jobs]
    results = run_jobs(jobs, Options(force=True), workers=2)
    assert [r.status for r in results] == ["converted"] * 3
    assert [j.output.read_bytes() for j in jobs] == serial


def test_what_the_jobs_name_is_checked_before_any_work_naming_python_arguments(tmp_path):
    # A bad spec or a missing calibration file failed each job after others had run; from
    # Python, messages name the API's arguments, not the CLI's flags.
    jobs = make_jobs(tmp_path, 2)
    missing = [jobs[0], replace(jobs[1], calibration=tmp_path / "c.pt")]
    with pytest.raises(RefqError, match=r"^calibration='.*c\.pt': no such calibration file"):
        prepare_run(missing, Options())
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\ndefaults: {dtype: qint16}\n")
    with pytest.raises(RefqError, match=r"bad\.yaml:2:19"):
        prepare_run([jobs[0], replace(jobs[1], spec=bad)], Options())
    with pytest.raises(RefqError, match=r"is a directory; give the checkpoints in it"):
        prepare_run([replace(jobs[0], input=tmp_path)], Options())
    assert not any(j.output.exists() for j in jobs)
    with pytest.raises(RefqError, match=r"^report='r\.md': give the JSON path"):
        output_paths(tmp_path / "m.pt", report=Path("r.md"))
    with pytest.raises(RefqError, match=r"^shard='0/3': K must be between 1 and N"):
        parse_shard("0/3")
