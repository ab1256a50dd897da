"""The report's probe as a setting: the spec's ``report:``, --probe-steps / --probe-sequences,
0 steps measuring nothing; refq verify sizes its probe the same way."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn
from typer.testing import CliRunner

import refq_cli
from refq_cli.cli.app import app
from refq_cli.errors import ConversionError, RefqError, SpecError
from refq_cli.pipeline.report import to_markdown
from refq_cli.spec.spec import ProbeSetting, parse_spec
from tests.checkpoints import speech_calibration, write

SPEC = {
    "version": 1,
    "defaults": {"dtype": "int4"},
    "rules": [{"match": "aux", "skip": True}],
    "modules": {"aux": {"nonlinearity": "relu"}, "context": {"batch_first": True}},
}
PROBE_KEYS = ("probe_shape", "output_sqnr_db", "output_max_abs_error", "hidden_error_per_step")


def _tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def _rows(report) -> dict[str, dict]:
    return {m["path"]: m for m in report["modules"] if not m["skipped"]}


def test_the_spec_reads_checks_and_records_report_settings():
    spec = parse_spec("version: 1\nreport:\n  probe_steps: 5\n  probe_sequences: 2\n", "q.yaml")
    assert spec.probe == ProbeSetting(5, 2) and not spec.probe.off
    assert spec.to_dict()["report"] == {"probe_steps": 5, "probe_sequences": 2}
    assert "report" not in parse_spec("version: 1\n", "q.yaml").to_dict()  # bytes as before
    assert parse_spec("version: 1\nreport:\n", "q.yaml").probe == ProbeSetting(16, 4)
    assert parse_spec("version: 1\nreport: {probe_steps: 0}\n", "q.yaml").probe.off
    for text, message in [
        ("report: {probe_steps: -1}", "q.yaml:2:23: .*probe_steps"),
        ("report: {probe_sequences: 0}", "q.yaml:2:27: .*probe_sequences"),
        ("report: {probe_steps: 2.5}", "q.yaml:2:23: .*probe_steps"),
        ("report: {probe_step: 3}", "q.yaml:2:10: .*probe_step"),
        ("report: [1]", "q.yaml:2:9: "),
    ]:
        with pytest.raises(SpecError, match=message):
            parse_spec(f"version: 1\n{text}\n", "q.yaml")


def test_flags_override_the_spec_and_are_checked():
    spec = parse_spec("version: 1\nreport: {probe_steps: 5, probe_sequences: 2}\n", "q.yaml")
    assert spec.probing(None, None) == spec
    assert spec.probing(7, None).probe == ProbeSetting(7, 2)
    assert spec.probing(None, 9).to_dict()["report"] == {"probe_steps": 5, "probe_sequences": 9}
    for steps, sequences, message in [
        (-1, None, r"^probe_steps=-1: give a whole number from 0 to 1,000,000$"),
        (None, 0, r"^probe_sequences=0: give a whole number from 1 to 100,000$"),
        (True, None, "probe_steps=True"),
        ("3", None, "probe_steps='3'"),
        (2_000_000, None, "probe_steps=2000000"),
    ]:
        with pytest.raises(SpecError, match=message):
            spec.probing(steps, sequences)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return write(tmp_path_factory.mktemp("probe"), "pt")


def test_the_probe_takes_the_size_asked_for(tmp_path, source):
    report = refq_cli.convert(
        source, SPEC, tmp_path / "a.st", probe_steps=5, probe_sequences=3
    ).report
    rows = _rows(report)
    assert rows["encoder"]["probe_shape"] == [5, 3, 6]
    assert rows["context"]["probe_shape"] == [3, 5, 6]  # batch_first
    assert all(len(m["hidden_error_per_step"]) == 5 for m in rows.values())
    default = _rows(refq_cli.convert(source, SPEC, tmp_path / "b.st").report)
    assert default["encoder"]["probe_shape"] == [16, 4, 6]


def test_no_probe_measures_nothing_and_keeps_the_artifacts_tensors(tmp_path, source):
    measured = refq_cli.convert(source, SPEC, tmp_path / "a.st")
    off = refq_cli.convert(source, {**SPEC, "report": {"probe_steps": 0}}, tmp_path / "b.st")
    for path, row in _rows(off.report).items():
        assert row["probe"] == "none" and not any(k in row for k in PROBE_KEYS), path
        assert row["reference_type"] == _rows(measured.report)[path]["reference_type"]
    a, b = _tensors(tmp_path / "a.st"), _tensors(tmp_path / "b.st")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert off.metadata["refq.spec"]["report"] == {"probe_steps": 0}
    markdown = to_markdown(off.report)
    assert markdown.count("not measured (probe_steps: 0)") == len(_rows(off.report))


def test_no_probe_with_calibration_still_fits_gptq_on_it(tmp_path, source):
    calibration = speech_calibration(tmp_path)
    spec = {**SPEC, "defaults": {"dtype": "int4", "observer": "output", "rounding": "gptq"}}
    measured = refq_cli.convert(source, spec, tmp_path / "a.st", calibration=calibration)
    off = refq_cli.convert(source, spec, tmp_path / "b.st", calibration=calibration, probe_steps=0)
    assert all("calibration" in m for m in _rows(measured.report).values())
    assert all(m["probe"] == "none" and "calibration" not in m for m in _rows(off.report).values())
    a, b = _tensors(tmp_path / "a.st"), _tensors(tmp_path / "b.st")
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same Hessians, so the same codes


def test_verify_probes_as_the_conversion_did_unless_told(tmp_path, source):
    artifact = tmp_path / "a.st"
    spec = {**SPEC, "report": {"probe_steps": 6, "probe_sequences": 2}}
    report = refq_cli.convert(source, spec, artifact).report
    result = refq_cli.verify(artifact, source)
    for row in result["modules"]:
        assert row["output_sqnr_db"] == _rows(report)[row["path"]]["output_sqnr_db"]
        assert len(row["hidden_error_per_step"]) == 6
    told = refq_cli.verify(artifact, source, probe_steps=3, probe_sequences=5)
    assert {tuple(r["probe_shape"]) for r in told["modules"]} >= {(3, 5, 6), (5, 3, 6)}
    with pytest.raises(RefqError, match=r"^probe_steps=0: verify measures the output error"):
        refq_cli.verify(artifact, source, probe_steps=0)


def test_verify_refuses_an_artifact_converted_without_a_probe_until_told(tmp_path, source):
    artifact = tmp_path / "a.st"
    refq_cli.convert(source, SPEC, artifact, probe_steps=0)
    with pytest.raises(RefqError, match=r"converted with report: probe_steps: 0.*probe_steps=16"):
        refq_cli.verify(artifact, source)
    assert refq_cli.verify(artifact, source, probe_steps=16)["modules"]


def test_cli_flags_reach_convert_batch_and_verify(tmp_path, source):
    spec = tmp_path / "q.yaml"
    spec.write_text(json.dumps(SPEC))
    runner = CliRunner()
    common = [str(source), "-q", str(spec), "--probe-steps", "3", "--probe-sequences", "2"]
    one = runner.invoke(app, ["convert", *common, "-o", str(tmp_path / "a.st"), "--quiet"])
    assert one.exit_code == 0, one.output
    rows = _rows(json.loads((tmp_path / "a.st.report.json").read_text()))
    assert rows["encoder"]["probe_shape"] == [3, 2, 6]
    batch = runner.invoke(app, ["convert", *common, "--out-dir", str(tmp_path / "out")])
    assert batch.exit_code == 0, batch.output
    rows = _rows(json.loads((tmp_path / "out" / "model.refq.report.json").read_text()))
    assert rows["encoder"]["probe_shape"] == [3, 2, 6]
    verified = runner.invoke(
        app, ["verify", str(tmp_path / "a.st"), "--against", str(source), "--json"]
    )
    assert verified.exit_code == 0, verified.output
    assert {len(m["hidden_error_per_step"]) for m in json.loads(verified.output)["modules"]} == {3}
    bad = runner.invoke(app, ["convert", *common[:3], "--probe-steps", "-2"])
    assert bad.exit_code == 2 and "--probe-steps -2: give a whole number" in bad.output
    assert not list(tmp_path.glob("model.refq*"))  # refused before anything was written


def test_skip_unchanged_sees_a_changed_probe(tmp_path, source):
    spec = tmp_path / "q.yaml"
    spec.write_text(json.dumps(SPEC))
    runner = CliRunner()
    args = ["convert", str(source), "-q", str(spec), "--out-dir", str(tmp_path / "o")]
    assert runner.invoke(app, [*args, "--skip-unchanged"]).exit_code == 0
    again = runner.invoke(app, [*args, "--skip-unchanged", "--json"])
    assert json.loads(again.output)["jobs"][0]["status"] == "skipped", again.output
    changed = runner.invoke(app, [*args, "--skip-unchanged", "--probe-steps", "4", "--json"])
    assert json.loads(changed.output)["jobs"][0]["status"] == "converted", changed.output


def test_help_gives_the_defaults_the_probe_has():
    text = CliRunner().invoke(app, ["convert", "--help"], env={"COLUMNS": "200"}).output
    default = ProbeSetting()
    assert f"[default: {default.steps};" in text and f"[default: {default.sequences}]" in text


def test_a_probe_that_overflows_is_a_failed_conversion_not_an_exact_one(tmp_path):
    # its NaN output once read as "exact", with NaN errors, and the conversion passed
    model = nn.Module()
    model.rnn = nn.RNN(4, 8, nonlinearity="relu")
    with torch.no_grad():
        model.rnn.weight_hh_l0.fill_(1e30)  # finite, but h grows past float32 in two steps
    source = tmp_path / "big.pt"
    torch.save(model.state_dict(), source)
    spec = {"version": 1, "modules": {"rnn": {"nonlinearity": "relu", "batch_first": False}}}
    out = tmp_path / "a.st"
    with pytest.raises(
        ConversionError,
        match=r"^rnn: the float module's output on the random "
        r"probe holds NaN or infinity .*--probe-steps 0$",
    ):
        refq_cli.convert(source, spec, out)
    assert not list(tmp_path.glob("a.st*"))
    refq_cli.convert(source, spec, out, probe_steps=0)  # converting without measuring works
    with pytest.raises(ConversionError, match=r"^rnn: the float module's output"):
        refq_cli.verify(out, source, probe_steps=16)


def test_a_probe_too_big_to_hold_is_refused_wherever_it_is_set(tmp_path, source):
    # each value alone was in range, and their product allocated 19 TB
    with pytest.raises(SpecError, match=r"^q.yaml:2:9: a probe of 1,000,000 steps x 100,000 "):
        parse_spec(
            "version: 1\nreport: {probe_steps: 1000000, probe_sequences: 100000}\n", "q.yaml"
        )
    spec = parse_spec("version: 1\nreport: {probe_sequences: 1000}\n", "q.yaml")
    with pytest.raises(SpecError, match=r"^probe_steps=1000: a probe of 1,000 steps x 1,000 "):
        spec.probing(1000, None)
    with pytest.raises(SpecError, match=r"rows; give at most 100,000 \(probe_steps x probe_seq"):
        refq_cli.convert(source, SPEC, tmp_path / "a.st", probe_steps=10_000, probe_sequences=11)
    assert not list(tmp_path.iterdir())


def test_the_default_given_as_a_flag_changes_nothing(tmp_path, source):
    spec = parse_spec("version: 1\n", "q.yaml")
    assert spec.probing(16, 4).to_dict() == spec.to_dict()  # --skip-unchanged: still up to date
    assert spec.probing(16, 5).to_dict()["report"] == {"probe_sequences": 5}


def _with_stored_report(path, report) -> None:
    import struct

    raw = path.read_bytes()
    size = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + size])
    stored = json.loads(header["__metadata__"]["refq.spec"])
    header["__metadata__"]["refq.spec"] = json.dumps({**stored, "report": report})
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + size :])


def test_verify_reads_a_hostile_recorded_probe_safely(tmp_path, source):
    artifact = tmp_path / "a.st"
    refq_cli.convert(source, SPEC, artifact)
    for junk, message in [
        ({"probe_steps": "x"}, r"its spec's report: is not one this refq reads .*probe_steps=16"),
        ({"probe_steps": 10**6, "probe_sequences": 10**5}, r"a probe of 1,000,000 steps"),
    ]:
        _with_stored_report(artifact, junk)
        with pytest.raises(RefqError, match=message):
            refq_cli.verify(artifact, source)
        told = refq_cli.verify(artifact, source, probe_steps=2, probe_sequences=3)  # replaces it
        assert {len(m["hidden_error_per_step"]) for m in told["modules"]} == {2}


def test_an_internal_error_fails_its_job_alone(tmp_path, source, monkeypatch):
    from refq_cli.pipeline import batch
    from refq_cli.pipeline.jobs import Job, Options

    spec = tmp_path / "q.yaml"
    spec.write_text(json.dumps(SPEC))
    jobs = [Job(source, spec, tmp_path / f"{n}.st", tmp_path / f"{n}.json") for n in "ab"]
    real = batch.convert_job

    def flaky(job, options, *args, **kwargs):
        if job.output.name == "a.st":
            raise RuntimeError("can't allocate memory")
        return real(job, options, *args, **kwargs)

    monkeypatch.setattr(batch, "convert_job", flaky)
    first, second = batch.run_jobs(jobs, Options())
    assert first.status == "failed" and first.exit_code == 1
    assert first.error == "internal error: RuntimeError: can't allocate memory"
    assert second.status == "converted" and jobs[1].output.exists()
