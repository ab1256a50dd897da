"""Where refq convert and refq batch find their inputs and put their outputs: a glob's tree kept
under --out-dir (or --root's), sharded checkpoints as one input, normalised paths, and what is
checked before any work (exit 2, nothing written) against what fails a job (exit 1)."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from refq_cli.cli.app import app
from refq_cli.pipeline.jobs import glob_folder
from tests.checkpoints import write_sharded
from tests.scripts import run_refq

SPEC = "version: 1\nmodules:\n  aux: {nonlinearity: relu}\n  context: {batch_first: true}\n"


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def tree(root: Path, *names: str) -> None:
    """Empty files at ``names`` (enough to list jobs) and the spec q.yaml."""
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).touch()
    (root / "q.yaml").write_text(SPEC)


def listed(*args) -> list[tuple[str, str]]:
    """(input, output) of each job ``refq ARGS --list --json`` lists."""
    result = invoke(*args, "--list", "--json")
    assert result.exit_code == 0, result.output
    return [(j["input"], j["output"]) for j in json.loads(result.stdout)["jobs"]]


def refused(*args) -> str:
    """The one line of ``refq ARGS``, which must exit 2 before any work."""
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("refq: error: ")
    return line.removeprefix("refq: error: ")


def test_a_glob_keeps_its_tree_under_out_dir(tmp_path, monkeypatch):
    # models/a/x.pt and models/b/x.pt both wrote out/x.refq.safetensors: refused as a collision.
    monkeypatch.chdir(tmp_path)
    tree(tmp_path, "models/a/x.pt", "models/b/x.pt", "models/b/deep/y.pt", "models/top.pt")
    assert listed("convert", "models/**/*.pt", "-q", "q.yaml", "--out-dir", "out") == [
        ("models/a/x.pt", "out/a/x.refq.safetensors"),
        ("models/b/deep/y.pt", "out/b/deep/y.refq.safetensors"),
        ("models/b/x.pt", "out/b/x.refq.safetensors"),
        ("models/top.pt", "out/top.refq.safetensors"),
    ]
    # a path given alone goes straight into --out-dir, as before
    assert listed("convert", "models/a/x.pt", "-q", "q.yaml", "--out-dir", "out") == [
        ("models/a/x.pt", "out/x.refq.safetensors")
    ]
    # --root: every input's folder relative to it, paths given alone included
    args = ["convert", "models/*/x.pt", "models/top.pt", "-q", "q.yaml", "--out-dir", "out"]
    assert listed(*args, "--root", ".") == [
        ("models/a/x.pt", "out/models/a/x.refq.safetensors"),
        ("models/b/x.pt", "out/models/b/x.refq.safetensors"),
        ("models/top.pt", "out/models/top.refq.safetensors"),
    ]


def test_the_fixed_part_of_a_glob():
    assert glob_folder("models/**/*.pt") == Path("models")
    assert glob_folder("models/a*/b/*.pt") == Path("models")
    assert glob_folder("*.pt") == glob_folder("**") == glob_folder("./*.pt") == Path(".")
    assert glob_folder("../*.pt") == Path("..")
    assert glob_folder("/*/m.pt") == Path("/")
    assert glob_folder("a/[bc]/m.pt") == Path("a")


def test_globs_whose_fixed_part_is_dot_dotdot_or_absolute(tmp_path, monkeypatch):
    tree(tmp_path, "src/a/x.pt", "src/y.pt")
    monkeypatch.chdir(tmp_path / "src")
    assert listed("convert", "**/*.pt", "-q", "../q.yaml", "--out-dir", "../out") == [
        ("a/x.pt", "../out/a/x.refq.safetensors"),
        ("y.pt", "../out/y.refq.safetensors"),
    ]
    monkeypatch.chdir(tmp_path / "src" / "a")
    assert listed("convert", "../*.pt", "-q", "../../q.yaml", "--out-dir", "o") == [
        ("../y.pt", "o/y.refq.safetensors")
    ]
    absolute = listed(
        "convert", f"{tmp_path}/src/**/*.pt", "-q", tmp_path / "q.yaml", "--out-dir", "o"
    )
    assert absolute == [
        (f"{tmp_path}/src/a/x.pt", "o/a/x.refq.safetensors"),
        (f"{tmp_path}/src/y.pt", "o/y.refq.safetensors"),
    ]


def test_two_stars_alone_and_an_out_dir_inside_the_input_tree(tmp_path, monkeypatch):
    # With --out-dir inside the tree, the next run's glob matched the artifacts themselves.
    monkeypatch.chdir(tmp_path)
    tree(
        tmp_path,
        "models/a/x.pt",
        "models/out/a/x.refq.safetensors",
        "models/out/a/x.refq.report.json",
    )
    (tmp_path / "models/out/a/x.refq.rejected.safetensors").touch()
    jobs = listed("convert", "models/**/*", "-q", "q.yaml", "--out-dir", "models/out")
    assert jobs == [("models/a/x.pt", "models/out/a/x.refq.safetensors")]
    assert [i for i, _ in listed("convert", "**", "-q", "q.yaml", "--out-dir", "o")] == [
        "models/a/x.pt",
        "q.yaml",  # what '**' asks for: its job fails, not being a checkpoint
    ]
    line = refused("convert", "models/out/**/*", "-q", "q.yaml", "--out-dir", "o")
    assert line == "models/out/**/*: matches no file but refq's own outputs, which are never inputs"


ROOT_REFUSALS = {
    "without-out-dir": (
        ["--root", "models"],
        "--root says where under --out-dir the artifacts go; give --out-dir too",
    ),
    "a-file": (
        ["--root", "q.yaml", "--out-dir", "o"],
        "--root q.yaml: is not a folder; give the folder whose tree the artifacts mirror under "
        "the output folder",
    ),
    "missing": (["--root", "nowhere", "--out-dir", "o"], "--root nowhere: no such folder;"),
    "an-input-outside": (
        ["--root", "models/a", "--out-dir", "o"],
        "--root models/a: the input models/b/x.pt is not inside it; give a folder that holds "
        "every input",
    ),
}


@pytest.mark.parametrize(("args", "message"), ROOT_REFUSALS.values(), ids=ROOT_REFUSALS.keys())
def test_bad_roots_are_refused_naming_root_and_the_input(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    tree(tmp_path, "models/a/x.pt", "models/b/x.pt")
    line = refused("convert", "models/**/*.pt", "-q", "q.yaml", *args)
    assert line.startswith(message), line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models", "q.yaml"]  # nothing written


def test_a_root_that_is_a_link_to_the_inputs_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tree(tmp_path, "models/a/x.pt")
    Path("link").symlink_to(tmp_path / "models")
    args = ["-q", "q.yaml", "--out-dir", "o", "--root", "link"]
    assert listed("convert", "models/**/*.pt", *args) == [
        ("models/a/x.pt", "o/a/x.refq.safetensors")
    ]
    assert listed("convert", "link/**/*.pt", *args) == [("link/a/x.pt", "o/a/x.refq.safetensors")]


def test_trees_that_meet_are_refused_as_one_output(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tree(tmp_path, "one/m/x.pt", "two/m/x.pt")
    line = refused("convert", "one/**/*.pt", "two/**/*.pt", "-q", "q.yaml", "--out-dir", "o")
    assert line == (
        "one/m/x.pt and two/m/x.pt would both write o/m/x.refq.safetensors; give them different "
        "output folders or names (an output folder keeps the inputs' folders below a glob's "
        "fixed part, so give the glob in quotes, or below a root)"
    )


def test_names_with_spaces_and_unicode_keep_their_tree(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tree(tmp_path, "mödels dir/a b/x y.pt")
    assert listed("convert", "mödels dir/**/*.pt", "-q", "q.yaml", "--out-dir", "ö u") == [
        ("mödels dir/a b/x y.pt", "ö u/a b/x y.refq.safetensors")
    ]


def test_a_manifest_mixing_paths_and_globs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tree(tmp_path, "project/models/a/x.pt", "project/models/b/x.pt", "project/lone.pt")
    Path("project/q.yaml").write_text(SPEC)
    Path("project/ci").mkdir()
    Path("project/ci/m.yaml").write_text(
        "version: 1\ndefaults: {spec: ../q.yaml, out_dir: ../out}\njobs:\n"
        "  - input: '../models/**/*.pt'\n  - input: ../lone.pt\n"
        "  - {input: ../models/a/x.pt, root: .., out_dir: ../tree}\n"
    )
    assert listed("batch", "project/ci/m.yaml") == [
        ("project/models/a/x.pt", "project/out/a/x.refq.safetensors"),
        ("project/models/b/x.pt", "project/out/b/x.refq.safetensors"),
        ("project/lone.pt", "project/out/lone.refq.safetensors"),
        ("project/models/a/x.pt", "project/tree/models/a/x.refq.safetensors"),
    ]


def test_paths_print_normalised_unless_a_link_says_otherwise(tmp_path, monkeypatch):
    # examples/ci/manifest.yaml's ../models/example.pt printed as examples/ci/../models/...
    monkeypatch.chdir(tmp_path)
    tree(tmp_path, "sub/m.pt", "far/deep/n.pt")
    Path("sub/link").symlink_to(tmp_path / "far" / "deep")
    result = invoke(
        "convert", "sub/../sub/m.pt", "sub/link/../deep/n.pt", "-q", "./q.yaml", "--list"
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "sub/m.pt -> sub/m.refq.safetensors (q.yaml)",
        # link/.. is far/, not sub/: kept as written, and its artifact goes beside it, in far/deep
        "sub/link/../deep/n.pt -> sub/link/../deep/n.refq.safetensors (q.yaml)",
    ]
    root = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(root)
    result = invoke("batch", "examples/ci/manifest.yaml", "--list", "--json")
    (job,) = json.loads(result.stdout)["jobs"]
    assert (job["input"], job["spec"], job["output"]) == (
        "examples/models/example.pt",
        "examples/models/example.yaml",
        "out/ci/example.refq.safetensors",
    )


def test_a_sharded_checkpoint_converts_as_one_named_after_its_index(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    index = write_sharded(tmp_path / "hub" / "tagger")
    bin_index = write_sharded(tmp_path / "hub" / "bin", "bin")
    Path("q.yaml").write_text("version: 1\n")
    assert listed("convert", "hub/**/*", "-q", "q.yaml", "--out-dir", "out") == [
        ("hub/bin/pytorch_model.bin.index.json", "out/bin/pytorch_model.refq.safetensors"),
        ("hub/tagger/model.safetensors.index.json", "out/tagger/model.refq.safetensors"),
    ]
    assert listed("convert", index, "-q", "q.yaml") == [
        (str(index), str(index.with_name("model.refq.safetensors")))
    ]
    assert bin_index.exists()
    # a shard is an input of the run: never written over, even with --force
    shard = index.with_name("model-00001-of-00002.safetensors")
    before = shard.read_bytes()
    line = refused("convert", index, "-q", "q.yaml", "-o", shard, "--force")
    assert line == f"--output {shard}: would overwrite the input shard {shard}; pick another path"
    assert shard.read_bytes() == before


def test_folders_given_as_inputs_are_refused_with_the_glob_to_give(tmp_path, monkeypatch):
    # A folder was a job that failed ("FAILED fleet: is a directory"), after the others ran.
    monkeypatch.chdir(tmp_path)
    tree(tmp_path, "fleet/a.pt", "fleet/b.pt")
    write_sharded(tmp_path / "hub")
    expected = (
        "fleet: is a directory; give the checkpoints in it, as a glob in quotes: 'fleet/**/*.pt'"
    )
    assert refused("convert", "fleet", "-q", "q.yaml") == expected
    assert refused("convert", "fleet/a.pt", "fleet", "-q", "q.yaml", "--out-dir", "o") == expected
    assert refused("convert", "hub", "-q", "q.yaml") == (
        "hub: is a directory; give its sharded checkpoint's index hub/model.safetensors.index.json"
    )
    tree(tmp_path, "runs/last.ckpt")  # the glob it suggests is for what the folder holds
    assert refused("convert", "runs", "-q", "q.yaml").endswith("in quotes: 'runs/**/*.ckpt'")
    assert not Path("o").exists()


def test_missing_files_are_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tree(tmp_path, "models/a.pt")
    assert refused("convert", "models/b.pt", "-q", "q.yaml") == (
        "models/b.pt: no such checkpoint file; did you mean 'a.pt'?"
    )
    assert refused("convert", "models/a.pt", "-q", "q.yaml", "--calibration", "c.pt") == (
        "--calibration c.pt: no such calibration file; check the path"
    )
    args = ["models/a.pt", "-q", "q.yaml", "--calibration", "models", "--out-dir", "o"]
    assert (
        refused("convert", *args) == "--calibration models: is a directory, not a calibration file"
    )
    Path("m.yaml").write_text(
        "version: 1\ndefaults: {spec: q.yaml, out_dir: o}\njobs:\n"
        "  - input: models/a.pt\n    calibration: calib.pt\n"
    )
    assert refused("batch", "m.yaml") == (
        "m.yaml:5:18: calibration 'calib.pt': no such calibration file; check the path"
    )
    assert not Path("o").exists()


ALIKE = [
    ["convert", "nope.pt", "-q", "q.yaml"],
    ["convert", "models", "-q", "q.yaml", "--json"],
    ["convert", "models/a.pt", "-q", "q.yaml", "--calibration", "nope.pt"],
    ["convert", "models/a.pt", "-q", "q.yaml", "--root", "models"],
    ["convert", "models/**/*.pt", "-q", "q.yaml", "--root", "models/a.pt", "--out-dir", "o"],
    ["convert", "none/*.pt", "-q", "q.yaml"],
    ["batch", "m.yaml"],
    ["convert", "models/a.pt", "-q", "q.yaml", "--out-dir", "o"],  # a job that fails: exit 1
]


def test_the_runner_and_the_real_process_agree_on_each_new_check(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tree(tmp_path, "models/a.pt")
    Path("m.yaml").write_text("version: 1\njobs:\n  - {input: models, spec: q.yaml}\n")
    for args in ALIKE:
        runner = invoke(*args)
        real = run_refq(*args, cwd=tmp_path)
        assert runner.exit_code == real.returncode, (args, runner.output, real.stderr)
        assert runner.stderr.splitlines()[-1] == real.stderr.splitlines()[-1], args
        assert real.returncode == (1 if args is ALIKE[-1] else 2), (args, real.stderr)
    module = [sys.executable, "-m", "refq_cli", *ALIKE[0]]
    import subprocess

    done = subprocess.run(module, capture_output=True, text=True, env={**os.environ}, check=False)
    assert done.returncode == 2 and "nope.pt: no such checkpoint file" in done.stderr


def test_a_link_loop_under_two_stars_is_refused_instead_of_walked_for_ever(tmp_path, monkeypatch):
    # glob follows links to folders: with models/a -> . and models/b -> . it walked 2**40
    # paths (the test timed out); a loop through two folders is one too.
    monkeypatch.chdir(tmp_path)
    tree(tmp_path, "models/x.pt", "other/y.pt")
    Path("models/a").symlink_to(".")
    Path("models/b").symlink_to(".")
    line = refused("convert", "models/**/*.pt", "-q", "q.yaml")
    assert line == (
        "models/**/*.pt: models/a is a link to ., which holds it: '**' would follow it round for "
        "ever; remove the link or give a glob without '**' there"
    )
    assert listed("convert", "models/*.pt", "-q", "q.yaml") == [  # no '**': a bounded walk
        ("models/x.pt", "models/x.refq.safetensors")
    ]
    Path("models/a").unlink()
    Path("models/b").unlink()
    Path("models/to-other").symlink_to(tmp_path / "other")
    Path("other/back").symlink_to(tmp_path / "models")
    assert "models/to-other/back is a link to" in refused(
        "convert", "models/**/*.pt", "-q", "q.yaml"
    )
    Path("other/back").unlink()  # models/to-other alone: a link to another tree, no loop
    assert listed("convert", "models/**/*.pt", "-q", "q.yaml", "--out-dir", "o") == [
        ("models/to-other/y.pt", "o/to-other/y.refq.safetensors"),
        ("models/x.pt", "o/x.refq.safetensors"),
    ]


def test_shards_under_other_names_are_left_out_too(tmp_path, monkeypatch):
    # The Hugging Face cache: a snapshot's files are links to blobs named by their hash.
    monkeypatch.chdir(tmp_path)
    snapshot = tmp_path / "hub" / "snapshots" / "abc"
    index = write_sharded(snapshot)
    blobs = tmp_path / "hub" / "blobs"
    blobs.mkdir()
    for shard in sorted(snapshot.glob("*.safetensors")):
        target = blobs / f"sha-{shard.name[6:11]}"
        shard.rename(target)
        shard.symlink_to(target)
    Path("q.yaml").write_text("version: 1\n")
    jobs = listed("convert", "hub/**/*", "-q", "q.yaml")  # blobs/sha-00001, ... too
    assert [i for i, _ in jobs] == [str(index.relative_to(tmp_path))]


def test_the_index_under_its_blob_name_and_a_file_reached_twice_convert_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    snapshot = tmp_path / "hub" / "snapshots" / "abc"
    index = write_sharded(snapshot)
    blobs = tmp_path / "hub" / "blobs"
    blobs.mkdir()
    for n, part in enumerate(sorted(snapshot.iterdir())):  # the index is a blob's link too
        target = blobs / f"blob{n}"
        part.rename(target)
        part.symlink_to(target)
    Path("q.yaml").write_text("version: 1\n")
    jobs = listed("convert", "hub/**/*", "-q", "q.yaml")
    assert [i for i, _ in jobs] == [str(index.relative_to(tmp_path))]
    Path("models/b").mkdir(parents=True)
    shutil.copy(index.with_name("model-00001-of-00002.safetensors"), "models/b/x.safetensors")
    Path("models/a").mkdir()
    Path("models/a/lb").symlink_to("../b")  # models/a/lb/x.safetensors is models/b/x...
    jobs = listed("convert", "models/**/*.safetensors", "-q", "q.yaml", "--out-dir", "o")
    assert [i for i, _ in jobs] == ["models/a/lb/x.safetensors"]


def test_the_shards_of_an_index_refq_will_refuse_are_still_never_written_over(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    index = write_sharded(tmp_path / "hub")
    index.with_name("model-00002-of-00002.safetensors").unlink()  # its job will fail
    shard = index.with_name("model-00001-of-00002.safetensors")
    before = shard.read_bytes()
    tree(tmp_path, "other.pt")
    Path("m.yaml").write_text(
        "version: 1\ndefaults: {spec: q.yaml}\njobs:\n  - input: hub/model.safetensors.index.json\n"
        f"  - {{input: other.pt, output: {shard.relative_to(tmp_path)}}}\n"
    )
    line = refused("batch", "m.yaml", "--force")
    assert "would overwrite the input shard hub/model-00001-of-00002.safetensors" in line
    assert shard.read_bytes() == before
