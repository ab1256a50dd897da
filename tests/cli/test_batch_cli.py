"""Several checkpoints in one refq convert, and refq batch with manifests and shards."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from refq_cli.cli.app import app
from tests.checkpoints import write
from tests.scripts import run_and_check_torch, run_refq

SPEC = "version: 1\nmodules:\n  aux: {nonlinearity: relu}\n  context: {batch_first: true}\n"


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def sources(tmp_path, count):
    paths = []
    for i in range(count):
        folder = tmp_path / "ckpts" / f"run{i}"
        folder.mkdir(parents=True)
        paths.append(write(folder, "pt", seed=i).rename(folder / f"model{i}.pt"))
    (tmp_path / "q.yaml").write_text(SPEC)
    return paths


def test_many_inputs_and_globs_in_one_convert(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sources(tmp_path, 3)
    result = invoke("convert", "ckpts/*/model*.pt", "-q", "q.yaml", "--out-dir", "out", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["totals"]["converted"] == 3
    assert [r["output"] for r in summary["jobs"]] == [  # the tree below the glob's 'ckpts'
        f"out/run{i}/model{i}.refq.safetensors" for i in range(3)
    ]
    assert all((tmp_path / r["output"]).exists() for r in summary["jobs"])


def test_a_failure_among_good_jobs_exits_1_and_reports_every_job(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    paths = sources(tmp_path, 3)
    paths[1].write_bytes(b"\x80\x02 truncated")
    summary_md = tmp_path / "summary.md"
    result = invoke(
        "convert", *paths, "-q", "q.yaml", "--out-dir", "out", "--json", "--summary-md", summary_md
    )
    assert result.exit_code == 1
    jobs = json.loads(result.stdout)["jobs"]
    assert [j["status"] for j in jobs] == ["converted", "failed", "converted"]
    assert "cannot read the checkpoint" in jobs[1]["error"]
    assert "1 of 3 job(s) failed" in result.stderr
    table = summary_md.read_text()
    assert table.startswith("## refq batch conversion") and "| failed |" in table


def test_plain_lines_per_job(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sources(tmp_path, 2)
    result = invoke("convert", "ckpts/*/*.pt", "-q", "q.yaml", "--out-dir", "out")
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("CONVERTED ckpts/run0/model0.pt -> out/run0/model0.refq.safetensors")
    assert lines[-1] == "2 converted"


def test_output_names_one_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sources(tmp_path, 2)
    result = invoke("convert", "ckpts/*/*.pt", "-q", "q.yaml", "-o", "x.safetensors")
    assert result.exit_code == 2 and "with several inputs use --out-dir" in result.output


def test_outputs_that_would_collide_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    paths = sources(tmp_path, 2)
    paths[1].rename(paths[1].with_name("model0.pt"))
    both = ["ckpts/run0/model0.pt", "ckpts/run1/model0.pt"]  # paths: straight into --out-dir
    result = invoke("convert", *both, "-q", "q.yaml", "--out-dir", "out")
    assert result.exit_code == 2 and "would both write out/model0.refq.safetensors" in result.output
    # two globs whose trees meet: run0/model0.pt below ckpts and below ckpts/* alike
    result = invoke("convert", "ckpts/**/*.pt", "ckpts/run1/*.pt", "-q", "q.yaml", "--out-dir", "o")
    assert result.exit_code == 0, result.output  # one file matched twice is one job
    result = invoke(
        "convert", "ckpts/run0/*.pt", "ckpts/run1/*.pt", "-q", "q.yaml", "--out-dir", "o2"
    )
    assert result.exit_code == 2 and "would both write o2/model0.refq.safetensors" in result.output
    assert not Path("o2").exists() and not Path("out").exists()


def test_batch_manifest_shards_cover_every_job_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sources(tmp_path, 5)
    (tmp_path / "m.yaml").write_text(
        "version: 1\ndefaults: {spec: q.yaml, out_dir: out}\njobs:\n  - input: 'ckpts/**/*.pt'\n"
    )
    listed = []
    for k in (1, 2, 3):
        result = invoke("batch", "m.yaml", "--shard", f"{k}/3", "--list", "--json")
        assert result.exit_code == 0, result.output
        listed += [j["input"] for j in json.loads(result.stdout)["jobs"]]
    assert sorted(listed) == sorted(f"ckpts/run{i}/model{i}.pt" for i in range(5))
    result = invoke("batch", "m.yaml", "--shard", "2/3", "--json")
    assert result.exit_code == 0, result.output
    ran = [j["input"] for j in json.loads(result.stdout)["jobs"]]
    assert ran == [
        j["input"]
        for j in json.loads(invoke("batch", "m.yaml", "--shard", "2/3", "--list", "--json").stdout)[
            "jobs"
        ]
    ]


def test_batch_skip_unchanged_and_bad_manifest(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sources(tmp_path, 2)
    (tmp_path / "m.yaml").write_text(
        "version: 1\ndefaults: {spec: q.yaml, out_dir: out}\njobs:\n  - input: 'ckpts/*/*.pt'\n"
    )
    assert invoke("batch", "m.yaml").exit_code == 0
    result = invoke("batch", "m.yaml", "--skip-unchanged", "--json")
    assert json.loads(result.stdout)["totals"]["skipped"] == 2
    (tmp_path / "bad.yaml").write_text(
        "version: 1\njobs:\n  - {input: a.pt, spec: q.yaml, outdir: o}\n"
    )
    result = invoke("batch", "bad.yaml")
    assert result.exit_code == 2
    assert result.output.startswith("refq: error: bad.yaml:3:33: unknown key 'outdir'")


def test_finding_every_artifact_up_to_date_imports_no_torch(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sources(tmp_path, 2)
    args = ["convert", "ckpts/*/*.pt", "-q", "q.yaml", "--out-dir", "out", "--skip-unchanged"]
    assert invoke(*args).exit_code == 0
    output, imported_torch = run_and_check_torch(args)
    assert "2 skipped" in output and not imported_torch


def test_bad_shards(tmp_path):
    (tmp_path / "q.yaml").write_text(SPEC)
    for text in ("0/3", "4/3", "x", "1/0"):
        result = invoke(
            "convert", write(tmp_path, "pt"), "-q", tmp_path / "q.yaml", "--shard", text
        )
        assert result.exit_code == 2 and f"--shard {text}" in result.output


def test_the_ci_example_runs_every_shard(tmp_path):
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    repo = tmp_path / "repo"
    for part in ("examples", "configs"):
        shutil.copytree(root / part, repo / part)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    for k in (1, 2):
        subprocess.run(
            ["bash", "examples/ci/convert-shard.sh", str(k), "2"],
            cwd=repo,
            env=env,
            check=True,
            capture_output=True,
        )
    converted = []
    for k in (1, 2):
        summary = json.loads((repo / "out" / "ci" / f"refq-summary-{k}.json").read_text())
        converted += [j["input"] for j in summary["jobs"] if j["status"] == "converted"]
        assert (repo / "out" / "ci" / f"refq-summary-{k}.md").read_text().startswith("## refq")
    assert len(converted) == 1 and converted[0].endswith("example.pt")
    assert (repo / "out" / "ci" / "example.refq.safetensors").exists()
    assert sorted(p.name for p in repo.iterdir()) == ["configs", "examples", "out"]  # nothing else


def test_a_shard_never_writes_over_another_shards_input(tmp_path, monkeypatch):
    # Outputs were checked against the shard's own inputs only: with --force, shard 2 wrote
    # its artifact over victim.pt, the input of a job of shard 1.
    monkeypatch.chdir(tmp_path)
    sources(tmp_path, 1)
    victim = write(tmp_path, "pt", seed=7).rename(tmp_path / "victim.pt")
    before = victim.read_bytes()
    Path("m.yaml").write_text(
        "version: 1\ndefaults: {spec: q.yaml}\njobs:\n"
        "  - {input: ckpts/run0/model0.pt, output: victim.pt}\n"
        "  - {input: victim.pt, output: v.refq.safetensors}\n"
    )
    for k in (1, 2):
        result = invoke("batch", "m.yaml", "--force", "--shard", f"{k}/2")
        if (
            "victim.pt"
            in invoke("batch", "m.yaml", "--shard", f"{k}/2", "--list").stdout.split(" -> ")[-1]
        ):
            assert result.exit_code == 2 and "would overwrite the input" in result.output
    assert victim.read_bytes() == before


def test_one_failed_input_gives_the_same_json_shape_as_many(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "q.yaml").write_text(SPEC)
    Path("bad.pt").write_bytes(b"\x80\x02 truncated")  # a checkpoint refq cannot read
    result = invoke("convert", "bad.pt", "-q", "q.yaml", "--json")
    assert result.exit_code == 2
    (job,) = json.loads(result.stdout)["jobs"]
    assert job["status"] == "failed" and "bad.pt" in job["error"]


def test_a_missing_input_stops_the_run_before_any_work_one_input_or_many(tmp_path, monkeypatch):
    # A missing path was a failed job (exit 1 among many, with a --json record) while an
    # unmatched glob stopped the run (exit 2): now both stop it, naming the path.
    monkeypatch.chdir(tmp_path)
    sources(tmp_path, 1)
    for args in (["nope.pt"], ["ckpts/run0/model0.pt", "nope.pt"]):
        result = invoke("convert", *args, "-q", "q.yaml", "--json", "--out-dir", "out")
        assert result.exit_code == 2 and result.stdout == ""
        assert result.stderr == (
            "refq: error: nope.pt: no such checkpoint file; check the path\n"
        ), result.stderr
        assert not Path("out").exists()


def test_a_path_the_terminal_cannot_show_does_not_stop_a_batch(tmp_path):
    folder = tmp_path / "ü"
    folder.mkdir()
    write(folder, "pt").rename(folder / "mödel.pt")
    write(tmp_path, "pt", seed=1)
    (tmp_path / "q.yaml").write_text(SPEC)
    args = ["convert", folder / "mödel.pt", tmp_path / "model.pt", "-q", tmp_path / "q.yaml"]
    args += ["--out-dir", tmp_path / "out"]
    result = run_refq(*args, env={"PYTHONIOENCODING": "ascii"})
    assert result.returncode == 0, result.stderr
    assert "2 converted" in result.stdout and "m\\xf6del.pt" in result.stdout


def test_workers_print_no_torch_noise(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sources(tmp_path, 2)
    result = run_refq(
        "convert", "ckpts/*/*.pt", "-q", "q.yaml", "--out-dir", "o", "--jobs", "2", "--quiet"
    )
    assert result.returncode == 0 and result.stderr == "", result.stderr


def test_each_job_that_assumed_facts_says_so(tmp_path):
    from typer.testing import CliRunner

    from refq_cli.cli.app import app

    example = Path(__file__).resolve().parents[2] / "examples" / "models" / "example.pt"
    (tmp_path / "q.yaml").write_text("version: 1\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["convert", str(example), "-q", str(tmp_path / "q.yaml"), "--out-dir", str(out)]
    )
    assert result.exit_code == 0
    assert "refq: warning: example.pt: weights cannot tell these facts" in result.stderr
    assert "modules.encoder.batch_first: false" in result.stderr
