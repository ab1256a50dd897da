"""The library's entry points (``refq_cli.convert``, ``load_artifact``, ``inspect``, ``diff``,
``verify``, ``batch``): what the CLI does, with Python arguments, and one name for the root."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import refq_cli
from refq_cli.errors import ArtifactError, CheckpointError, RefqError, SpecError
from refq_cli.spec.spec import load_spec
from tests.checkpoints import Speech, write

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "models" / "example.pt"
EXAMPLE_FACTS = {"version": 1, "modules": {"encoder": {"batch_first": True}}}
SPEECH_FACTS = {"modules": {"aux": {"nonlinearity": "relu"}, "context": {"batch_first": True}}}


def test_importing_the_package_imports_no_torch_and_lists_the_entry_points():
    code = "import sys, refq_cli; print('torch' in sys.modules, sorted(refq_cli.__all__))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split(" ", 1)[0] == "False"
    for name in ("convert", "load_artifact", "inspect", "diff", "verify", "batch"):
        assert name in out.stdout and callable(getattr(refq_cli, name))


@pytest.mark.parametrize("given", ["path", "Spec", "dict"])
def test_convert_takes_a_spec_as_a_path_a_spec_or_a_dict_and_writes_the_reports(tmp_path, given):
    path = tmp_path / "q.yaml"
    path.write_text(json.dumps(EXAMPLE_FACTS))
    spec = {"path": path, "Spec": load_spec(path), "dict": EXAMPLE_FACTS}[given]
    conversion = refq_cli.convert(EXAMPLE, spec, tmp_path / "out" / "m.refq.safetensors")
    assert conversion.passed
    assert conversion.output == tmp_path / "out" / "m.refq.safetensors"
    assert conversion.report_json == tmp_path / "out" / "m.refq.report.json"
    assert json.loads(conversion.report_json.read_text()) == json.loads(
        json.dumps(conversion.report)
    )
    assert conversion.report_md.read_text().startswith("# refq conversion report")
    assert conversion.report["spec"] == ("spec=<dict>" if given == "dict" else "q.yaml")
    art = refq_cli.load_artifact(conversion.output)
    assert set(art.modules) == {"encoder", "decoder"}


def test_every_way_of_giving_the_spec_gives_the_same_artifact(tmp_path):
    path = tmp_path / "q.yaml"
    path.write_text(json.dumps(EXAMPLE_FACTS))
    a = refq_cli.convert(EXAMPLE, path, tmp_path / "a.refq.safetensors")
    b = refq_cli.convert(EXAMPLE, EXAMPLE_FACTS, tmp_path / "b.refq.safetensors")
    assert refq_cli.diff(a.output, b.output) == []
    assert a.output.read_bytes() == b.output.read_bytes()


def test_errors_from_python_name_python_arguments(tmp_path):
    out = tmp_path / "m.refq.safetensors"
    refq_cli.convert(EXAMPLE, EXAMPLE_FACTS, out)
    with pytest.raises(
        ArtifactError, match=r"^output='.*m.refq.safetensors': already exists; pass force=True"
    ):
        refq_cli.convert(EXAMPLE, EXAMPLE_FACTS, out)
    other = tmp_path / "n.refq.safetensors"
    with pytest.raises(RefqError, match=r"^device='tpu': use cpu or cuda"):
        refq_cli.convert(EXAMPLE, EXAMPLE_FACTS, other, device="tpu")
    with pytest.raises(RefqError, match=r"^calibration='.*nope.pt': no such calibration file"):
        refq_cli.convert(EXAMPLE, EXAMPLE_FACTS, other, calibration=tmp_path / "nope.pt")
    with pytest.raises(RefqError, match=r"^min_sqnr=nan: give a finite number"):
        refq_cli.convert(EXAMPLE, EXAMPLE_FACTS, other, min_sqnr=float("nan"))
    with pytest.raises(RefqError, match=r"^workers=0: give a whole number, at least 1"):
        refq_cli.batch([], workers=0)
    assert not other.exists()


def test_a_dict_spec_is_checked_as_a_file_is_and_named_as_an_argument():
    with pytest.raises(
        SpecError, match=r"^spec=<dict>: .*dtype must be one of .*did you mean 'int4'"
    ):
        refq_cli.convert(EXAMPLE, {"version": 1, "defaults": {"dtype": "int9"}}, "x.st")
    with pytest.raises(
        SpecError, match=r"^spec: give a spec file's path, a Spec or a dict, not int"
    ):
        refq_cli.convert(EXAMPLE, 3, "x.st")  # type: ignore[arg-type]
    assert not Path("x.st").exists()


def test_a_missed_gate_returns_with_its_files_set_aside(tmp_path):
    conversion = refq_cli.convert(
        EXAMPLE, EXAMPLE_FACTS, tmp_path / "m.refq.safetensors", min_sqnr=200
    )
    assert not conversion.passed
    assert conversion.output == tmp_path / "m.refq.rejected.safetensors"
    assert conversion.output.is_file() and conversion.report_md.name == "m.refq.rejected.report.md"
    assert not (tmp_path / "m.refq.safetensors").exists()


def test_the_root_module_is_named_root_everywhere(tmp_path):
    torch.manual_seed(0)
    torch.save(nn.LSTM(4, 5).state_dict(), tmp_path / "lstm.pt")
    conversion = refq_cli.convert(tmp_path / "lstm.pt", {"version": 1}, tmp_path / "lstm.st")
    assert list(conversion.modules) == ["<root>"]
    assert {w["module"] for w in conversion.report["weights"]} == {"<root>"}
    assert [m["path"] for m in conversion.report["modules"]] == ["<root>"]
    assert list(refq_cli.load_artifact(conversion.output).modules) == ["<root>"]
    rows = refq_cli.inspect(conversion.output, module="<root>")["weights"]
    assert {w["module"] for w in rows} == {"<root>"} and len(rows) == 2
    assert [
        m["path"] for m in refq_cli.verify(conversion.output, tmp_path / "lstm.pt")["modules"]
    ] == ["<root>"]
    assert "| &lt;root&gt; |" in conversion.report_md.read_text()  # shown as text, not HTML
    assert list(conversion.metadata["refq.modules"]) == [""]  # the stored form: PyTorch's path


def test_inspect_and_the_report_show_the_scheme_the_spec_asked_for(tmp_path):
    conversion = refq_cli.convert(EXAMPLE, EXAMPLE_FACTS, tmp_path / "m.refq.safetensors")
    assert {w["qscheme"] for w in conversion.report["weights"]} == {"per_channel_symmetric"}
    assert {w["qscheme"] for w in refq_cli.inspect(conversion.output)["weights"]} == {
        "per_channel_symmetric"
    }
    stored = conversion.metadata["refq.modules"]["encoder"]["weights"]["weight_ih_l0"]
    assert stored["qscheme"] == "per_channel_affine"  # what the reference modules read
    assert stored["spec_qscheme"] == "per_channel_symmetric"
    markdown = conversion.report_md.read_text()
    assert "| qscheme | dtype | observer |" in markdown
    assert "| per_channel_symmetric | qint8 | minmax |" in markdown


def lightning_checkpoint(tmp_path: Path, prefix: str = "model.") -> Path:
    torch.manual_seed(0)
    state = {prefix + k: v for k, v in Speech().state_dict().items()}
    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": state, "epoch": 3, "optimizer_states": [{"lr": 0.1}]}, path)
    return path


@pytest.mark.parametrize("prefix", ["model.", "module."])
def test_a_spec_for_the_bare_model_says_which_option_strips_a_wrapper(tmp_path, prefix):
    path = lightning_checkpoint(tmp_path, prefix)
    with pytest.raises(
        SpecError,
        match=rf"modules.aux: no recurrent module at this path; found: .*{prefix}aux.*; the "
        rf"checkpoint's modules are under '{prefix}': add strip_prefix: {prefix} to the spec "
        rf"or pass strip_prefix='{prefix}'",
    ):
        refq_cli.convert(path, {"version": 1, **SPEECH_FACTS}, tmp_path / "a.st")
    with pytest.raises(SpecError, match=rf"rule match 'enc\*' matches no .*under '{prefix}'"):
        refq_cli.convert(
            path, {"version": 1, "rules": [{"match": "enc*", "skip": True}]}, tmp_path / "a.st"
        )


@pytest.mark.parametrize("how", ["spec", "argument"])
def test_a_lightning_checkpoint_converts_with_its_prefix_stripped(tmp_path, how):
    path = lightning_checkpoint(tmp_path)
    spec = {"version": 1, **SPEECH_FACTS} | ({"strip_prefix": "model."} if how == "spec" else {})
    extra = {"strip_prefix": "model."} if how == "argument" else {}
    conversion = refq_cli.convert(path, spec, tmp_path / "a.st", **extra)
    assert conversion.metadata["refq.spec"]["strip_prefix"] == "model."
    art = refq_cli.load_artifact(conversion.output)
    assert "encoder" in art.modules and "frontend.weight" in art.tensors
    model = art.apply_to(Speech())
    assert model.encoder is art.modules["encoder"]


def test_a_prefix_given_twice_must_agree(tmp_path):
    path = lightning_checkpoint(tmp_path)
    spec = {"version": 1, "strip_prefix": "model.", **SPEECH_FACTS}
    with pytest.raises(
        SpecError, match=r"strip_prefix='module.': the spec spec=<dict> says strip_prefix: model."
    ):
        refq_cli.convert(path, spec, tmp_path / "a.st", strip_prefix="module.")


def test_apply_to_maps_a_wrapper_prefix_onto_the_bare_model(tmp_path):
    path = lightning_checkpoint(tmp_path)
    spec = {"version": 1, "modules": {f"model.{k}": v for k, v in SPEECH_FACTS["modules"].items()}}
    art = refq_cli.load_artifact(refq_cli.convert(path, spec, tmp_path / "a.st").output)
    assert "model.encoder" in art.modules
    model = Speech()
    with pytest.raises(
        ArtifactError,
        match=r"the model has no module at 'model.(\w+)'; it has '\1': pass strip_prefix='model.'",
    ):
        art.apply_to(model)
    assert isinstance(model.encoder, nn.LSTM)  # left as it was
    art.apply_to(model, strip_prefix="model.")
    assert model.encoder is art.modules["model.encoder"]
    assert torch.equal(model.head.weight, art.tensors["model.head.weight"])


def test_the_entry_points_print_no_torch_warnings(tmp_path):
    torch.manual_seed(0)
    torch.save(nn.LSTM(4, 6, proj_size=3).state_dict(), tmp_path / "p.pt")  # oneDNN warns here

    def stderr(script: str) -> str:
        return subprocess.run(
            [sys.executable, "-W", "always", "-c", "import torch, refq_cli\n" + script],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            check=True,
        ).stderr

    control = "torch.nn.LSTM(4, 6, proj_size=3)(torch.randn(2, 1, 4))"  # warns once a process
    assert "not supported with oneDNN" in stderr(control)
    spec = "{'version': 1, 'modules': {'<root>': {'batch_first': False}}}"  # no fact assumed
    ours = f"c = refq_cli.convert('p.pt', {spec}, 'p.st'); refq_cli.verify(c.output, 'p.pt')"
    assert stderr(ours) == ""


def test_batch_runs_a_manifest_and_reports_every_job(tmp_path):
    for name in ("a", "b"):
        write(tmp_path, "pt").rename(tmp_path / f"{name}.pt")
    (tmp_path / "q.yaml").write_text(json.dumps({"version": 1, **SPEECH_FACTS}))
    (tmp_path / "jobs.yaml").write_text(
        "version: 1\ndefaults: {spec: q.yaml, out_dir: out}\njobs:\n  - input: '*.pt'\n"
    )
    seen: list = []
    results = refq_cli.batch(tmp_path / "jobs.yaml", on_result=seen.append)
    assert [(Path(r.input).name, r.status) for r in results] == [
        ("a.pt", "converted"),
        ("b.pt", "converted"),
    ]
    assert seen == results
    assert (tmp_path / "out" / "a.refq.safetensors").is_file()
    again = refq_cli.batch(tmp_path / "jobs.yaml", skip_unchanged=True)
    assert [r.status for r in again] == ["skipped", "skipped"]
    with pytest.raises(RefqError, match=r"^shard='3/2': K must be between 1 and N"):
        refq_cli.batch(tmp_path / "jobs.yaml", shard="3/2")


def test_batch_sizes_every_jobs_probe_as_refq_batch_does(tmp_path):
    write(tmp_path, "pt").rename(tmp_path / "a.pt")
    (tmp_path / "q.yaml").write_text(json.dumps({"version": 1, **SPEECH_FACTS}))
    (tmp_path / "jobs.yaml").write_text(
        "version: 1\ndefaults: {spec: q.yaml, out_dir: out}\njobs:\n  - input: a.pt\n"
    )
    with pytest.raises(SpecError, match=r"^probe_steps=-1: give a whole number from 0 to"):
        refq_cli.batch(tmp_path / "jobs.yaml", probe_steps=-1)
    assert not (tmp_path / "out").exists()
    (result,) = refq_cli.batch(tmp_path / "jobs.yaml", probe_steps=3, probe_sequences=2)
    probed = json.loads(Path(result.report_json).read_text())["modules"]
    assert probed and all(sorted(m["probe_shape"][:2]) == [2, 3] for m in probed)
    (off,) = refq_cli.batch(tmp_path / "jobs.yaml", probe_steps=0, force=True)
    modules = json.loads(Path(off.report_json).read_text())["modules"]
    assert modules and all(m["probe"] == "none" for m in modules)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"version": 1, "defaults": {"dtype": "int9"}}, "defaults.dtype must be one of"),
        ({"version": 1, "rules": [{"match": "enc*", "dtype": "x"}]}, "rules[match='enc*'].dtype"),
        ({"version": 1, "modules": {"encoder": {"batch_first": 3}}}, "modules.encoder.batch_first"),
        ({"version": 2}, "spec version 2 is not supported"),
    ],
)
def test_a_dict_spec_error_names_the_key_path_it_has_no_line_for(spec, message):
    with pytest.raises(SpecError) as caught:
        refq_cli.convert(EXAMPLE, spec, "x.st")
    assert str(caught.value).startswith("spec=<dict>: ") and message in str(caught.value)


def test_an_artifact_naming_an_unknown_spec_qscheme_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from refq_cli.io.header import read_artifact, read_header

    conversion = refq_cli.convert(EXAMPLE, EXAMPLE_FACTS, tmp_path / "m.refq.safetensors")
    header = read_header(conversion.output)
    modules = json.loads(header["refq.modules"])
    modules["encoder"]["weights"]["weight_ih_l0"]["spec_qscheme"] = "per_row"
    header["refq.modules"] = json.dumps(modules)
    save_file(load_file(conversion.output), tmp_path / "bad.safetensors", metadata=header)
    with pytest.raises(ArtifactError, match=r"spec_qscheme must be one of .*got 'per_row'"):
        read_artifact(tmp_path / "bad.safetensors")


class _Runs:
    """A pickled object whose unpickling would create the file ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


@pytest.mark.parametrize("given", [{"trust_code": "False"}, {"trust_code": 1}, {"force": "no"}])
def test_a_switch_must_be_true_or_false(tmp_path, given):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(1), "x": _Runs(marker)}, evil)
    with pytest.raises(RefqError, match=r"^\w+=.*: give True or False$"):
        refq_cli.convert(evil, {"version": 1}, tmp_path / "e.st", **given)
    assert not marker.exists() and not (tmp_path / "e.st").exists()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: refq_cli.convert(EXAMPLE, EXAMPLE_FACTS, strip_prefix=1), "strip_prefix=1: give"),
        (lambda: refq_cli.convert(EXAMPLE, EXAMPLE_FACTS, min_sqnr="30"), "min_sqnr='30': give"),
        (lambda: refq_cli.convert(None, EXAMPLE_FACTS), "checkpoint=None: give a file's path"),
        (lambda: refq_cli.convert(EXAMPLE, EXAMPLE_FACTS, output=123), "output=123: give a file"),
        (lambda: refq_cli.convert(EXAMPLE, EXAMPLE_FACTS, device=None), "device=None: use cpu"),
        (lambda: refq_cli.convert(EXAMPLE, EXAMPLE_FACTS, strip_prefix=".."), "strip_prefix='..'"),
        (lambda: refq_cli.batch([], workers="2"), "workers='2': give a whole number"),
        (lambda: refq_cli.batch([], shard=1), "shard=1: write K/N"),
        (lambda: refq_cli.batch(["a.pt"]), "jobs: give a manifest's path or a list of"),
        (lambda: refq_cli.verify("a.st", "a.pt", min_sqnr="x"), "min_sqnr='x': give a number"),
    ],
)
def test_arguments_of_the_wrong_kind_are_one_line_errors(call, message):
    with pytest.raises(RefqError) as caught:
        call()
    assert message in str(caught.value)


def test_a_spec_dict_nested_too_deep_or_holding_an_object_is_refused():
    deep: dict = {}
    for _ in range(2000):
        deep = {"a": deep}
    with pytest.raises(SpecError, match=r"^spec=<dict>: nested too deep for a spec$"):
        refq_cli.convert(EXAMPLE, {"version": 1, "rules": [deep]}, "x.st")
    with pytest.raises(SpecError, match=r"^spec=<dict>: holds tensor\(.*\(Tensor\), which a spec"):
        refq_cli.convert(EXAMPLE, {"version": 1, "defaults": {"scale": torch.ones(2)}}, "x.st")


@pytest.mark.parametrize("output", ["", ".", "..", "new/", "out/.."])
def test_an_output_that_names_a_folder_is_refused_before_any_work(tmp_path, output, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RefqError, match=r"^output='.*': names a folder, not a file"):
        refq_cli.convert(EXAMPLE, EXAMPLE_FACTS, output)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_conversion_leaves_no_folder_it_made(tmp_path):
    path = lightning_checkpoint(tmp_path)
    with pytest.raises(SpecError):  # the spec does not fit: found only after reading
        refq_cli.convert(path, {"version": 1, **SPEECH_FACTS}, tmp_path / "new" / "deep" / "x.st")
    assert not (tmp_path / "new").exists()
    (tmp_path / "kept").mkdir()
    with pytest.raises(SpecError):
        refq_cli.convert(path, {"version": 1, **SPEECH_FACTS}, tmp_path / "kept" / "a" / "x.st")
    assert list((tmp_path / "kept").iterdir()) == []  # only what it made goes


def test_apply_to_maps_a_wrapper_that_is_the_module_itself(tmp_path):
    torch.manual_seed(0)
    torch.save({"model." + k: v for k, v in nn.LSTM(8, 8).state_dict().items()}, tmp_path / "w.pt")
    art = refq_cli.load_artifact(
        refq_cli.convert(tmp_path / "w.pt", {"version": 1}, tmp_path / "w.st").output
    )
    assert list(art.modules) == ["model"]
    lstm = art.apply_to(nn.LSTM(8, 8), strip_prefix="model.")
    assert lstm is art.modules["model"]


def test_a_job_stopped_by_fail_fast_names_the_python_argument(tmp_path):
    from refq_cli.pipeline.jobs import Job

    bad, good = tmp_path / "bad.pt", EXAMPLE
    torch.save({"x": torch.zeros(1)}, bad)  # no recurrent module: the job fails
    spec = tmp_path / "q.yaml"
    spec.write_text(json.dumps(EXAMPLE_FACTS))
    jobs = [
        Job(bad, spec, tmp_path / "b.st", tmp_path / "b.json"),
        Job(good, spec, tmp_path / "g.st", tmp_path / "g.json"),
    ]
    results = refq_cli.batch(jobs, fail_fast=True)
    assert [r.status for r in results] == ["failed", "not_run"]
    assert results[1].error == "stopped by fail_fast=True"


def test_facts_assumed_are_a_warning_from_python_and_in_every_job_record(tmp_path):
    from refq_cli.errors import RefqWarning

    with pytest.warns(RefqWarning, match=r"modules\.encoder\.batch_first: false"):
        refq_cli.convert(EXAMPLE, {"version": 1}, tmp_path / "a.st")
    spec = tmp_path / "q.yaml"
    spec.write_text("version: 1\n")
    job = f"{{input: {EXAMPLE}, spec: q.yaml, out_dir: out}}"  # not beside the bundled file
    (tmp_path / "m.yaml").write_text(f"version: 1\njobs:\n  - {job}\n")
    (result,) = refq_cli.batch(tmp_path / "m.yaml")
    assert "modules.encoder.batch_first: false" in result.warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a spec that gives every fact: no warning
        refq_cli.convert(EXAMPLE, EXAMPLE.with_suffix(".yaml"), tmp_path / "b.st")


def test_verify_against_the_bare_checkpoint_says_the_prefix_came_from_the_artifact(tmp_path):
    path = lightning_checkpoint(tmp_path)
    spec = {"version": 1, "strip_prefix": "model.", **SPEECH_FACTS}
    conversion = refq_cli.convert(path, spec, tmp_path / "a.st")
    assert refq_cli.verify(conversion.output, path)["source_matches"]  # the prefix, as recorded
    bare = write(tmp_path, "pt")
    with pytest.raises(
        CheckpointError, match=r"no key starts with it; .*\(the prefix .*a\.st was "
    ):
        refq_cli.verify(conversion.output, bare)


def test_verify_names_its_calibration_argument(tmp_path):
    conversion = refq_cli.convert(EXAMPLE, EXAMPLE_FACTS, tmp_path / "a.st")
    with pytest.raises(CheckpointError, match=r"^calibration='.*nope\.pt': no such calibration"):
        refq_cli.verify(conversion.output, EXAMPLE, calibration=tmp_path / "nope.pt")
