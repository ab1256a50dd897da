"""The batch manifest: jobs, defaults, globs, paths relative to the manifest's folder, and
errors at file:line:column."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from refq_cli.pipeline.manifest import ManifestError, load_manifest
from tests.checkpoints import write


def manifest(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "manifest.yaml"
    path.write_text(text)
    return path


def touch(folder: Path, *names: str) -> None:
    """Empty files at ``names`` under ``folder``: what a manifest names must exist."""
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).touch()


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
    touch(project, "models/a.pt", "models/b.pt", "q.yaml", "c/a.pt")
    touch(tmp_path, "shared/q.yaml", "abs.pt", "q.yaml")
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
    # written ../shared/q.yaml: normalised, as it names the same file
    assert (b.spec, b.output) == (Path("../shared/q.yaml"), base / "built" / "b.refq.safetensors")
    assert b.calibration is None and b.min_sqnr is None
    assert (absolute.input, absolute.spec) == (tmp_path / "abs.pt", tmp_path / "q.yaml")
    assert absolute.output == tmp_path / "abs.refq.safetensors"  # beside its input by default
    assert [j.input.resolve() for j in load_manifest(path)][:2] == [
        project / "models" / "a.pt",
        project / "models" / "b.pt",
    ]


def test_defaults_apply_to_every_job_that_does_not_set_its_own(tmp_path):
    touch(tmp_path, "a.pt", "b.pt", "c.pt", "q.yaml", "other.yaml", "c.pt")
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
    touch(tmp_path, "q.yaml", "q", "o")
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
        r"manifest.yaml:2:29: give output or out_dir, not both \(defaults included\)",
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
    touch(tmp_path, "a.pt", "q.yaml", "q", "r")
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


def test_a_globs_matches_keep_their_tree_under_out_dir_and_paths_go_straight_in(tmp_path):
    # out_dir flattened every match: models/a/x.pt and models/b/x.pt both wrote out/x...
    touch(tmp_path, "models/a/x.pt", "models/b/x.pt", "models/top.pt", "lone.pt", "q.yaml")
    jobs = load_manifest(
        manifest(
            tmp_path,
            "version: 1\ndefaults: {spec: q.yaml, out_dir: out}\njobs:\n"
            "  - input: 'models/**/*.pt'\n  - input: lone.pt\n"
            "  - {input: 'models/*/x.pt', root: ., out_dir: mirrored}\n",
        )
    )
    outputs = [j.output.relative_to(tmp_path).as_posix() for j in jobs]
    assert outputs == [
        "out/a/x.refq.safetensors",
        "out/b/x.refq.safetensors",
        "out/top.refq.safetensors",
        "out/lone.refq.safetensors",  # a path given alone: straight into out_dir
        "mirrored/models/a/x.refq.safetensors",  # relative to root, not to the glob's 'models'
        "mirrored/models/b/x.refq.safetensors",
    ]
    assert jobs[0].report == tmp_path / "out" / "a" / "x.refq.report.json"
    assert [j.input_key for j in jobs[:2]] == ["models/a/x.pt", "models/b/x.pt"]  # shards' keys


ROOT_ERRORS = {
    "outside-root": (
        "jobs:\n  - {input: 'models/**/*.pt', out_dir: o, root: models/a}\n",
        r"manifest.yaml:4:49: root 'models/a' \(.*models/a\): the input .*models/b/x.pt is not "
        r"inside it; give a folder that holds every input$",
    ),
    "root-without-out-dir": (
        "jobs:\n  - {input: 'models/**/*.pt', root: models}\n",
        r"manifest.yaml:4:37: root says where under out_dir the artifacts go; give out_dir too$",
    ),
    "root-is-a-file": (
        "jobs:\n  - {input: lone.pt, out_dir: o, root: lone.pt}\n",
        r"manifest.yaml:4:40: root 'lone.pt' \(.*\): is not a folder; give the folder whose tree",
    ),
    "root-is-missing": (
        "defaults: {spec: q.yaml, root: nowhere, out_dir: o}\njobs:\n  - {input: lone.pt}\n",
        r"manifest.yaml:2:32: root 'nowhere' \(.*\): no such folder",
    ),
    "missing-input": (
        "jobs:\n  - {input: models/a/y.pt}\n",
        r"manifest.yaml:4:13: input 'models/a/y.pt' \(.*\): no such checkpoint file; "
        r"did you mean 'x.pt'\?$",
    ),
    "folder-input": (
        "jobs:\n  - {input: models}\n",
        r"manifest.yaml:4:13: input 'models' \(.*\): is a directory; give the checkpoints in "
        r"it, as a glob in quotes: '.*models/\*\*/\*.pt'$",
    ),
    "missing-spec": (
        "jobs:\n  - {input: lone.pt, spec: qq.yaml}\n",
        r"manifest.yaml:4:28: spec 'qq.yaml' \(.*\): no such spec file; did you mean 'q.yaml'\?$",
    ),
    "missing-calibration": (
        "defaults: {spec: q.yaml, calibration: calib/c.pt}\njobs:\n  - {input: lone.pt}\n",
        r"manifest.yaml:2:39: calibration 'calib/c.pt' \(.*\): no such calibration file",
    ),
    "glob-leaves-its-folder": (
        "jobs:\n  - {input: 'models/*/../../lone.pt', out_dir: o}\n",
        r"manifest.yaml:4:13: models/\*/\.\./\.\./lone.pt: the glob's folder .*models \(a '\.\.' "
        r"after a glob character leaves it; give root\): the input .*lone.pt is not inside it",
    ),
}


@pytest.mark.parametrize(("jobs", "message"), ROOT_ERRORS.values(), ids=ROOT_ERRORS.keys())
def test_what_a_job_names_is_checked_as_the_manifest_is_read(tmp_path, jobs, message):
    # A missing input was a job that failed (exit 1) while an unmatched glob was a manifest
    # error (exit 2); a missing calibration file failed its job after the work had begun.
    touch(tmp_path, "models/a/x.pt", "models/b/x.pt", "lone.pt", "q.yaml")
    with pytest.raises(ManifestError, match=message):
        text = jobs if jobs.startswith("defaults") else "defaults: {spec: q.yaml}\n" + jobs
        load_manifest(manifest(tmp_path, f"version: 1\n{text}"))


def test_a_jobs_own_output_drops_the_default_root_and_out_dir(tmp_path):
    touch(tmp_path, "models/a/x.pt", "q.yaml")
    (job,) = load_manifest(
        manifest(
            tmp_path,
            "version: 1\ndefaults: {spec: q.yaml, out_dir: out, root: models}\n"
            "jobs:\n  - {input: models/a/x.pt, output: here.st}\n",
        )
    )
    assert job.output == tmp_path / "here.st"
    (job,) = load_manifest(  # a root applies to a path given alone too
        manifest(
            tmp_path,
            "version: 1\ndefaults: {spec: q.yaml, out_dir: out, root: models}\n"
            "jobs:\n  - {input: models/a/x.pt}\n",
        )
    )
    assert job.output == tmp_path / "out" / "a" / "x.refq.safetensors"


def test_paths_are_normalised_unless_a_link_makes_that_another_place(tmp_path, monkeypatch):
    # examples/ci/manifest.yaml's input ../models/example.pt printed as
    # examples/ci/../models/example.pt.
    monkeypatch.chdir(tmp_path)
    touch(tmp_path, "examples/models/example.pt", "examples/q.yaml", "elsewhere/deep/m.pt")
    (tmp_path / "examples" / "ci").mkdir()
    (tmp_path / "examples" / "link").symlink_to(tmp_path / "elsewhere" / "deep")
    Path("examples/ci/m.yaml").write_text(
        "version: 1\ndefaults: {spec: ../q.yaml, out_dir: ../out}\njobs:\n"
        "  - input: ../models/example.pt\n  - input: ../link/../deep/m.pt\n"
    )
    plain, linked = load_manifest(Path("examples/ci/m.yaml"))
    assert (plain.input, plain.spec, plain.output) == (
        Path("examples/models/example.pt"),
        Path("examples/q.yaml"),
        Path("examples/out/example.refq.safetensors"),
    )
    # link/.. is elsewhere, not examples: the text cannot be simplified
    assert linked.input == Path("examples/ci/../link/../deep/m.pt")
    assert linked.input.resolve() == (tmp_path / "elsewhere" / "deep" / "m.pt")
    assert plain.input_key == "../models/example.pt"  # shard keys: as before


def test_a_sharded_checkpoint_is_one_input_named_after_its_index(tmp_path):
    touch(tmp_path, "q.yaml")
    for name, shards in (
        (
            "model.safetensors.index.json",
            ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"],
        ),
        ("pytorch_model.bin.index.json", ["pytorch_model-00001-of-00001.bin"]),
    ):
        folder = tmp_path / "hub" / name.split(".")[0]
        touch(folder, *shards, "config.json")
        (folder / name).write_text(
            json.dumps({"weight_map": {f"w{i}": s for i, s in enumerate(shards)}})
        )
    jobs = load_manifest(
        manifest(
            tmp_path,
            "version: 1\ndefaults: {spec: q.yaml, out_dir: out}\n"
            "jobs:\n  - input: 'hub/**/*'\n"
            "  - {input: hub/model/model-00001-of-00002.safetensors, out_dir: one}\n",
        )
    )
    found = [
        (j.input.relative_to(tmp_path).as_posix(), j.output.relative_to(tmp_path).as_posix())
        for j in jobs
    ]
    assert found == [
        ("hub/model/config.json", "out/model/config.refq.safetensors"),  # fails as a job
        ("hub/model/model.safetensors.index.json", "out/model/model.refq.safetensors"),
        ("hub/pytorch_model/config.json", "out/pytorch_model/config.refq.safetensors"),
        (
            "hub/pytorch_model/pytorch_model.bin.index.json",
            "out/pytorch_model/pytorch_model.refq.safetensors",
        ),
        # a shard given as a path is its own job, which refuses it, naming its index
        ("hub/model/model-00001-of-00002.safetensors", "one/model-00001-of-00002.refq.safetensors"),
    ]
    assert jobs[1].report.name == "model.refq.report.json"
    protected = [(d, p.name) for d, p in jobs[1].inputs()]
    assert protected == [
        ("input", "model.safetensors.index.json"),
        ("input shard", "model-00001-of-00002.safetensors"),
        ("input shard", "model-00002-of-00002.safetensors"),
        ("spec", "q.yaml"),
    ]
