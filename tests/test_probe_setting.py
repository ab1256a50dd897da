"""The report's probe as a setting: the spec's ``report:``, --probe-steps / --probe-sequences,
0 steps measuring nothing; refq verify sizes its probe the same way."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

import refq_cli
from refq_cli.cli.app import app
from refq_cli.errors import RefqError, SpecError
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
