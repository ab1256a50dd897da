"""Every command's --json output has the one shape refq_cli/schemas/output.schema.json documents:
for one input and many, converted, skipped, listed, failed and gated, and keys without spaces."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from typer.testing import CliRunner

from refq_cli.cli.app import app
from refq_cli.schemas import output_schema
from tests.checkpoints import write

SPEC = "version: 1\nmodules:\n  aux: {nonlinearity: relu}\n  context: {batch_first: true}\n"


def run(*args: Any, code: int = 0) -> dict[str, Any]:
    result = CliRunner().invoke(app, [str(a) for a in (*args, "--json")])
    assert result.exit_code == code, result.output
    return json.loads(result.stdout)


def check(command: str, output: dict[str, Any]) -> dict[str, Any]:
    schema = output_schema()
    Draft202012Validator({"$ref": f"#/$defs/{command}", "$defs": schema["$defs"]}).validate(output)
    keys = []
    stack: list[Any] = [output]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            keys += value
            stack += value.values()
        elif isinstance(value, list):
            stack += value
    assert not [k for k in keys if " " in k], keys
    return output


@pytest.fixture
def models(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for i in range(2):
        (tmp_path / "in" / str(i)).mkdir(parents=True)
        write(tmp_path / "in" / str(i), "pt", seed=i).rename(tmp_path / "in" / f"m{i}.pt")
    (tmp_path / "q.yaml").write_text(SPEC)
    return tmp_path


def test_the_schema_is_a_valid_json_schema_with_one_definition_per_command():
    schema = output_schema()
    Draft202012Validator.check_schema(schema)
    assert {"convert", "batch", "inspect", "inspect-diff", "verify", "export"} <= set(
        schema["$defs"]
    )


def test_convert_has_one_shape_for_one_input_and_many(models):
    one = check("convert", run("convert", "in/m0.pt", "-q", "q.yaml", "-o", "a.refq.safetensors"))
    many = check("convert", run("convert", "in/m*.pt", "-q", "q.yaml", "--out-dir", "out"))
    assert set(one) == set(many) == {"jobs", "totals"}
    assert set(one["jobs"][0]) == set(many["jobs"][0])
    assert [j["status"] for j in one["jobs"]] == ["converted"] and one["totals"]["converted"] == 1
    assert one["jobs"][0]["report_json"] == "a.refq.report.json"
    skipped = run("convert", "in/m*.pt", "-q", "q.yaml", "--out-dir", "out", "--skip-unchanged")
    assert check("convert", skipped)["totals"]["skipped"] == 2
    listed = check("convert", run("convert", "in/m*.pt", "-q", "q.yaml", "--list"))
    assert [j["status"] for j in listed["jobs"]] == ["listed", "listed"]


def test_a_missed_gate_is_a_structured_record(models):
    args = ["convert", "in/m0.pt", "-q", "q.yaml", "-o", "a.refq.safetensors", "--min-sqnr", "47"]
    (job,) = check("convert", run(*args, code=1))["jobs"]
    gate = job["gate"]
    assert job["status"] == "gate" and gate["passed"] is False and gate["min_sqnr_db"] == 47
    assert gate["measure"] == "weight_sqnr" and gate["below"]
    sqnrs = [b["sqnr_db"] for b in gate["below"]]
    assert sqnrs == sorted(sqnrs) and all(s < 47 for s in sqnrs)
    assert all(b["name"].count(".") >= 1 for b in gate["below"])  # module.weight
    assert job["output"] == "a.refq.rejected.safetensors"
    report = json.loads(Path(job["report_json"]).read_text())
    assert report["gate"] == gate  # the report file holds the same record


def test_failed_and_not_run_jobs_in_a_batch(models):
    Path("in/bad.pt").write_bytes(b"not a checkpoint")
    Path("m.yaml").write_text(
        "version: 1\ndefaults: {spec: q.yaml, out_dir: out}\n"
        "jobs:\n  - input: in/bad.pt\n  - input: 'in/m*.pt'\n"
    )
    out = check("batch", run("batch", "m.yaml", "--fail-fast", code=1))
    assert [j["status"] for j in out["jobs"]] == ["failed", "not_run", "not_run"]
    assert out["totals"]["not_run"] == 2 and out["jobs"][0]["error"]


def test_inspect_diff_and_verify(models):
    run("convert", "in/m*.pt", "-q", "q.yaml", "--out-dir", "out")
    a, b = "out/m0.refq.safetensors", "out/m1.refq.safetensors"
    check("inspect", run("inspect", a))
    assert "scales" in check("inspect", run("inspect", a, "--channels", "--all"))["weights"][0]
    assert check("inspect-diff", run("inspect", "--diff", a, a))["differences"] == []
    assert check("inspect-diff", run("inspect", "--diff", a, b, code=1))["differences"]
    passed = check("verify", run("verify", a, "--against", "in/m0.pt"))
    assert passed["gate"] is None and passed["source_matches"] is True
    missed = check("verify", run("verify", a, "--against", "in/m0.pt", "--min-sqnr", "200", code=1))
    assert missed["gate"]["measure"] == "output_sqnr" and not missed["gate"]["passed"]
    assert len(missed["gate"]["below"]) == len(missed["modules"])


def test_export(models):
    pytest.importorskip("onnx")
    run("convert", "in/m0.pt", "-q", "q.yaml", "-o", "m0.refq.safetensors")
    exported = check("export", run("export", "m0.refq.safetensors", "-o", "onnx"))
    assert [m["path"] for m in exported["models"]] == [
        f"onnx/{m['module']}.onnx" for m in exported["models"]
    ]
    assert all(Path(m["path"]).stat().st_size == m["bytes"] for m in exported["models"])
