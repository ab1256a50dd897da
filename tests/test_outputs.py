"""The output mechanism's everyday API: Outputs, write_file, check_outputs, starts_with.

Hostile cases (links, races, special files, stale temporaries) are in robustness/test_outputs.
"""

from __future__ import annotations

import pytest

from refq_cli.errors import ArtifactError, naming_flags
from refq_cli.io.outputs import Outputs, check_outputs, starts_with, write_file


def names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_staged_files_appear_together_at_commit(tmp_path):
    artifact, report = tmp_path / "a.refq.safetensors", tmp_path / "a.report.json"
    with Outputs({"--output": artifact, "--report": report}, {}) as outputs:
        outputs.write(artifact, b"codes")
        outputs.write(report, lambda f: f.write(b'{"ok": true}'))  # or what a callable writes
        assert not artifact.exists() and not report.exists()  # nothing before the commit
        outputs.commit()
        assert artifact.read_bytes() == b"codes" and report.read_bytes() == b'{"ok": true}'
    assert names(tmp_path) == ["a.refq.safetensors", "a.report.json"]  # no temporaries left


def test_what_is_not_committed_leaves_nothing(tmp_path):
    target = tmp_path / "a.bin"
    with Outputs({"output": target}, {}) as outputs:
        outputs.write(target, b"first")
        outputs.write(target, b"second")  # a second write replaces the staged file
    assert names(tmp_path) == []
    with Outputs({"output": target}, {}) as outputs:
        outputs.write(target, b"first")
        outputs.write(target, b"second")
        outputs.commit()
    assert target.read_bytes() == b"second" and names(tmp_path) == ["a.bin"]


def test_a_failing_writer_leaves_nothing_and_its_error_passes_through(tmp_path):
    target = tmp_path / "a.bin"

    def failing(f):
        f.write(b"half")
        raise ValueError("no more")

    with Outputs({"output": target}, {}) as outputs, pytest.raises(ValueError, match="no more"):
        outputs.write(target, failing)
    assert names(tmp_path) == []


def test_only_checked_outputs_are_written(tmp_path):
    with (
        Outputs({"output": tmp_path / "a.bin"}, {}) as outputs,
        pytest.raises(ValueError, match="is not one of the checked outputs"),
    ):
        outputs.write(tmp_path / "b.bin", b"x")
    assert names(tmp_path) == []


def test_an_existing_file_is_refused_without_force_and_replaced_with_it(tmp_path):
    target = tmp_path / "a.bin"
    target.write_bytes(b"someone's")
    with (
        naming_flags(),
        pytest.raises(ArtifactError, match=r"^--output .*a\.bin: already exists; pass --force"),
    ):
        Outputs({"--output": target}, {})
    with pytest.raises(ArtifactError, match=r"^output='.*a\.bin': already exists; pass force=True"):
        Outputs({"output": target}, {})  # from Python, an argument of the API as Python names it
    assert target.read_bytes() == b"someone's"
    with Outputs({"--output": target}, {}, force=True) as outputs:
        outputs.write(target, b"mine")
        outputs.commit()
    assert target.read_bytes() == b"mine"


def test_replaceable_says_which_existing_files_may_be_replaced(tmp_path):
    ours, theirs = tmp_path / "ours.md", tmp_path / "theirs.md"
    ours.write_text("# refq report\nold\n")
    theirs.write_text("my notes\n")
    ours_test = {"--summary-md": starts_with(b"# refq report")}
    with Outputs({"--summary-md": ours}, {}, replaceable=ours_test) as outputs:
        outputs.write(ours, b"# refq report\nnew\n")
        outputs.commit()
    assert ours.read_text() == "# refq report\nnew\n"
    with pytest.raises(ArtifactError, match=r"theirs\.md: already exists"):
        Outputs({"--summary-md": theirs}, {}, replaceable=ours_test)
    with pytest.raises(ArtifactError, match=r"ours\.md: already exists"):  # a test for another flag
        Outputs({"--report": ours}, {}, replaceable=ours_test)
    assert theirs.read_text() == "my notes\n"


def test_starts_with_tests_the_first_bytes(tmp_path):
    path = tmp_path / "a.md"
    path.write_bytes(b"# refq report and more")
    assert starts_with(b"# refq report")(path)
    assert not starts_with(b"# refq reports")(path)
    assert not starts_with(b"x")(tmp_path / "missing.md")


def test_write_file_checks_stages_and_moves_into_place(tmp_path):
    target = tmp_path / "q.yaml"
    write_file(target, b"version: 1\n")
    assert target.read_bytes() == b"version: 1\n" and names(tmp_path) == ["q.yaml"]
    with pytest.raises(ArtifactError, match=r"^-o .*q\.yaml: already exists"):
        write_file(target, b"again", flag="-o")
    write_file(target, b"again", replaceable=lambda p: p.read_bytes().startswith(b"version"))
    assert target.read_bytes() == b"again"
    write_file(target, lambda f: f.write(b"forced"), force=True)
    assert target.read_bytes() == b"forced"
    source = tmp_path / "model.pt"
    source.write_bytes(b"weights")
    with pytest.raises(ArtifactError, match=r"would overwrite the checkpoint .*model\.pt"):
        write_file(source, b"x", inputs={"checkpoint": source}, force=True)  # never an input
    assert source.read_bytes() == b"weights"


REFUSALS = {
    "over-an-input": (
        {"--output": "a.st", "--report": "q.yaml"},
        r"^--report .*q\.yaml: would overwrite the spec .*q\.yaml; pick another path$",
    ),
    "twice": (
        {"--output": "a.st", "--summary-md": "a.st"},
        r"^--summary-md .*a\.st: the same file as --output .*a\.st; give each output its own",
    ),
    "folder-is-a-file": (
        {"--json-out": "q.yaml/x.json"},
        r"^--json-out .*x\.json: the folder .*q\.yaml is not a directory$",
    ),
    "folder-under-a-file": (
        {"--json-out": "q.yaml/deeper/x.json"},
        r"^--json-out .*x\.json: cannot create the folder .*deeper: .*q\.yaml is not a directory$",
    ),
    "a-folder": ({"--out-dir": "."}, r"^--out-dir .*: is a directory; give a file path$"),
}


@pytest.mark.parametrize(("outputs", "message"), REFUSALS.values(), ids=REFUSALS.keys())
def test_check_outputs_names_the_flag_of_each_refusal(tmp_path, outputs, message):
    spec = tmp_path / "q.yaml"
    spec.write_text("version: 1\n")
    check_outputs({"--output": tmp_path / "a.st"}, {"spec": spec})  # a fine one passes
    with pytest.raises(ArtifactError, match=message):
        check_outputs({f: tmp_path / p for f, p in outputs.items()}, {"spec": spec}, force=True)
    assert names(tmp_path) == ["q.yaml"]  # checking writes nothing


def test_a_missing_folder_is_checked_before_any_work_and_made_once_all_outputs_pass(tmp_path):
    # -o into a missing folder was refused while --out-dir made one; now every output's
    # folder is made, once every output passed its checks: checking alone makes nothing.
    spec = tmp_path / "q.yaml"
    spec.write_text("version: 1\n")
    deep = tmp_path / "new" / "deeper" / "a.st"
    check_outputs({"output": deep}, {"spec": spec})
    assert names(tmp_path) == ["q.yaml"]
    with pytest.raises(ArtifactError, match=r"would overwrite the spec"):  # a later one refused
        Outputs({"output": deep, "report": tmp_path / "new" / ".." / "q.yaml"}, {"spec": spec})
    assert names(tmp_path) == ["q.yaml"]
    with Outputs({"output": deep, "report": tmp_path / "new" / "r.json"}, {}) as outputs:
        assert names(tmp_path / "new") == ["deeper"]  # made: a writer may put temporaries there
        outputs.write(deep, b"codes")
        outputs.write(tmp_path / "new" / "r.json", b"{}")
        outputs.commit()
    assert deep.read_bytes() == b"codes" and names(tmp_path / "new") == ["deeper", "r.json"]


@pytest.mark.skipif(__import__("os").geteuid() == 0, reason="root writes anywhere")
def test_a_missing_folder_under_a_read_only_one_is_refused_before_any_work(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    with pytest.raises(ArtifactError, match=r"the folder .*locked is not writable"):
        check_outputs({"output": locked / "new" / "a.st"}, {})
