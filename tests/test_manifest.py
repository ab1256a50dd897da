"""The batch manifest: jobs, defaults, globs, paths relative to the manifest's folder, and
errors at file:line:column."""

from __future__ import annotations

from pathlib import Path

import pytest

from refq_cli.pipeline.manifest import ManifestError, load_manifest
from tests.checkpoints import write


def manifest(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "manifest.yaml"
    path.write_text(text)
    return path


def test_manifest_jobs_globs_defaults_and_overrides(tmp_path):
    for i in range(3):
        (tmp_path / "ckpts").mkdir(exist_ok=True)
        write(tmp_path / "ckpts", "pt", seed=i).rename(tmp_path / "ckpts" / f"m{i}.pt")
    (tmp_path / "q.yaml").write_text("version: 1\n")
    jobs = load_manifest(
        manifest(
            tmp_path,
            """\
version: 1
defaults: {spec: q.yaml, out_dir: out}
jobs:
  - input: "ckpts/*.pt"
  - input: ckpts/m1.pt
    output: special/m1.refq.safetensors
    min_sqnr: 30
""",
        )
    )
    assert [j.input.name for j in jobs] == ["m0.pt", "m1.pt", "m2.pt", "m1.pt"]
    assert jobs[0].output == tmp_path / "out" / "m0.refq.safetensors"
    assert jobs[0].report == tmp_path / "out" / "m0.refq.report.json"
    assert jobs[3].output == tmp_path / "special" / "m1.refq.safetensors"
    assert jobs[3].min_sqnr == 30 and jobs[0].spec == tmp_path / "q.yaml"


def test_relative_paths_are_relative_to_the_manifests_folder(tmp_path, monkeypatch):
    project = tmp_path / "project"
    (project / "models").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # not the working directory
    path = manifest(
        project,
        "version: 1\njobs:\n"
        "  - {input: models/a.pt, spec: q.yaml, calibration: c/a.pt,\n"
        "     output: out/a.refq.safetensors}\n"
        "  - {input: models/b.pt, spec: ../shared/q.yaml, out_dir: built}\n"
        f"  - {{input: {tmp_path}/abs.pt, spec: {tmp_path}/q.yaml}}\n",
    )
    a, b, absolute = load_manifest(Path("..") / "project" / "manifest.yaml")
    base = Path("..") / "project"
    assert (a.input, a.spec, a.output, a.calibration) == (
        base / "models" / "a.pt",
        base / "q.yaml",
        base / "out" / "a.refq.safetensors",
        base / "c" / "a.pt",
    )
    assert a.report == base / "out" / "a.refq.report.json" and a.base == base
    assert (b.spec, b.output) == (base / "../shared/q.yaml", base / "built" / "b.refq.safetensors")
    assert b.calibration is None and b.min_sqnr is None
    assert (absolute.input, absolute.spec) == (tmp_path / "abs.pt", tmp_path / "q.yaml")
    assert absolute.output == tmp_path / "abs.refq.safetensors"  # beside its input by default
    assert [j.input.resolve() for j in load_manifest(path)][:2] == [
        project / "models" / "a.pt",
        project / "models" / "b.pt",
    ]


def test_defaults_apply_to_every_job_that_does_not_set_its_own(tmp_path):
    path = manifest(
        tmp_path,
        "version: 1\n"
        "defaults: {spec: q.yaml, out_dir: out, min_sqnr: 25, calibration: c.pt}\n"
        "jobs:\n"
        "  - input: a.pt\n"
        "  - {input: b.pt, spec: other.yaml, min_sqnr: 40.5}\n"
        "  - {input: c.pt, output: mine/c.st}  # its output replaces the default out_dir\n",
    )
    a, b, c = load_manifest(path)
    assert (a.spec, a.output, a.min_sqnr, a.calibration) == (
        tmp_path / "q.yaml",
        tmp_path / "out" / "a.refq.safetensors",
        25,
        tmp_path / "c.pt",
    )
    assert (b.spec, b.min_sqnr, b.output.parent) == (
        tmp_path / "other.yaml",
        40.5,
        tmp_path / "out",
    )
    assert (c.spec, c.output, c.min_sqnr) == (tmp_path / "q.yaml", tmp_path / "mine" / "c.st", 25)
    default_output = manifest(
        tmp_path,
        "version: 1\ndefaults: {spec: q.yaml, output: one.st}\n"
        "jobs:\n  - {input: a.pt, out_dir: out}\n",
    )
    (job,) = load_manifest(default_output)  # an out_dir of its own replaces the default output
    assert job.output == tmp_path / "out" / "a.refq.safetensors"


def test_globs_expand_to_sorted_files_recursively(tmp_path):
    for name in ("b/x.pt", "a/deep/y.pt", "a/z.pt", "top.pt", "a/notes.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "a" / "folder.pt").mkdir()  # a folder is not an input
    jobs = load_manifest(
        manifest(
            tmp_path,
            "version: 1\ndefaults: {spec: q.yaml, out_dir: out}\njobs:\n"
            "  - input: '**/*.pt'\n  - input: 'a/?.pt'\n    out_dir: single\n"
            "  - {input: 'b/*.pt', output: b.st}  # one match: output may name it\n",
        )
    )
    found = [j.input.relative_to(tmp_path).as_posix() for j in jobs]
    assert found == ["a/deep/y.pt", "a/z.pt", "b/x.pt", "top.pt", "a/z.pt", "b/x.pt"]
    assert jobs[4].output == tmp_path / "single" / "z.refq.safetensors"
    assert jobs[5].output == tmp_path / "b.st"
    with pytest.raises(
        ManifestError, match=r"^.*manifest\.yaml:3:43: output names one file but input matches 2"
    ):
        load_manifest(
            manifest(tmp_path, "version: 1\njobs:\n  - {input: 'a/**/*.pt', spec: q, output: o}\n")
        )


MANIFEST_ERRORS = {
    "unknown-key": (
        "version: 1\njobs:\n  - {input: a.pt, spce: q.yaml}\n",
        "manifest.yaml:3:19: unknown key 'spce' in a job; did you mean 'spec'",
    ),
    "unknown-top-key": (
        "version: 1\njob:\n  - {input: a.pt, spec: q.yaml}\n",
        "manifest.yaml:2:1: unknown key 'job' in the manifest; did you mean 'jobs'",
    ),
    "unknown-default": (
        "version: 1\ndefaults:\n  spec: q.yaml\n  outdir: out\njobs: []\n",
        "manifest.yaml:4:3: unknown key 'outdir' in defaults; did you mean 'out_dir'",
    ),
    "no-spec": ("version: 1\njobs:\n  - {input: a.pt}\n", "manifest.yaml:3:5: the job has no spec"),
    "no-input": (
        "version: 1\ndefaults: {spec: q}\njobs:\n  - {output: o}\n",
        "manifest.yaml:4:5: the job has no input",
    ),
    "no-jobs": ("version: 1\n", "manifest.yaml:1:1: the manifest lists no jobs"),
    "no-version": ("jobs: []\n", "manifest.yaml:1:1: missing 'version: 1' at the top"),
    "glob-matches-nothing": (
        "version: 1\njobs:\n  - {input: 'none/*.pt', spec: q.yaml}\n",
        "manifest.yaml:3:13: input 'none/\\*.pt' matches no file",
    ),
    "output-and-out-dir": (
        "version: 1\njobs:\n  - {input: a.pt, spec: q, output: o, out_dir: d}\n",
        "manifest.yaml:3:5: give output or out_dir, not both",
    ),
    "both-in-defaults": (
        "version: 1\ndefaults: {spec: q, output: o, out_dir: d}\njobs:\n  - input: a.pt\n",
        r"manifest.yaml:4:5: give output or out_dir, not both \(defaults included\)",
    ),
    "version": (
        "version: 2\njobs: []\n",
        "manifest.yaml:1:10: manifest version 2 is not supported",
    ),
    "min-sqnr-type": (
        "version: 1\njobs:\n  - {input: a.pt, spec: q, min_sqnr: high}\n",
        "manifest.yaml:3:38: min_sqnr must be a number, got 'high'",
    ),
    "jobs-not-a-list": (
        "version: 1\njobs: {input: a.pt}\n",
        "manifest.yaml:2:7: jobs must be a list",
    ),
    "same-output": (
        "version: 1\njobs:\n  - {input: a.pt, spec: q}\n  - {input: a.pt, spec: r}\n",
        "would both write",
    ),
    "python-tag": (
        "version: 1\njobs: !!python/object/apply:os.system ['true']\n",
        "manifest.yaml:2:7: tag 'tag:yaml.org,2002:python/object/apply:os.system' is "
        "not allowed in a manifest",
    ),
}


@pytest.mark.parametrize(("text", "message"), MANIFEST_ERRORS.values(), ids=MANIFEST_ERRORS.keys())
def test_bad_manifests_name_file_line_and_column(tmp_path, text, message):
    with pytest.raises(ManifestError, match=message):
        load_manifest(manifest(tmp_path, text))


def test_an_input_that_exists_is_taken_as_it_is_glob_characters_and_all(tmp_path):
    # refq convert took model[v2].pt as it is, a manifest read it as a glob matching nothing.
    write(tmp_path, "pt").rename(tmp_path / "model[v2].pt")
    (tmp_path / "q.yaml").write_text("version: 1\n")
    path = tmp_path / "m.yaml"
    path.write_text("version: 1\njobs:\n  - {input: 'model[v2].pt', spec: q.yaml, out_dir: o}\n")
    (job,) = load_manifest(path)
    assert job.input == tmp_path / "model[v2].pt"
