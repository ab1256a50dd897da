"""refq inspect and refq verify."""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors import safe_open
from typer.testing import CliRunner

from refq_cli.cli.app import app
from refq_cli.cli.inspect import render_table
from refq_cli.io.safetensors_writer import write_safetensors
from refq_cli.pipeline.convert import convert_checkpoint as convert
from refq_cli.pipeline.inspect import describe_artifact
from tests.checkpoints import write
from tests.scripts import run_and_check_torch

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "inspect_table.txt"
MIXED = """\
version: 1
rules:
  - {match: "encoder", qscheme: per_tensor_affine, dtype: quint8}
  - {match: "gate", qscheme: per_tensor_symmetric}
  - {match: "context", qscheme: per_channel_affine, dtype: quint8}
modules:
  aux: {nonlinearity: relu}
  context: {batch_first: true}
"""


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def make_artifact(tmp_path, body=MIXED, name="a.refq.safetensors", seed=0):
    source = write(tmp_path, "pt", seed=seed)
    spec = tmp_path / f"{name}.yaml"
    spec.write_text(body)
    path = tmp_path / name
    convert(source, spec, path, force=True)
    return path, source


def test_json_values_are_the_artifacts_own_tensors(tmp_path):
    path, _ = make_artifact(tmp_path)
    result = invoke("inspect", path, "--json", "--channels")
    assert result.exit_code == 0, result.output
    desc = json.loads(result.stdout)
    types = {w["module_type"] for w in desc["weights"]}
    assert types == {"LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell"}
    assert {w["qscheme"] for w in desc["weights"]} == {
        "per_tensor_affine",
        "per_tensor_symmetric",
        "per_channel_affine",
        "per_channel_symmetric",
    }  # as the spec named them
    assert len(desc["weights"]) == 22
    with safe_open(str(path), "pt") as f:
        for w in desc["weights"]:
            key = f"{w['module']}.{w['weight']}"
            scale = f.get_tensor(key + "_scale").reshape(-1)
            zero_point = f.get_tensor(key + "_zero_point").reshape(-1)
            assert w["scales"] == scale.tolist() and w["zero_points"] == zero_point.tolist()
            assert w["scale"]["min"] == scale.min().item()
            assert w["scale"]["max"] == scale.max().item()
            assert w["zero_point"]["max"] == zero_point.max().item()
            assert w["shape"] == list(f.get_slice(key).get_shape())


def test_filters_and_sorting(tmp_path):
    path, _ = make_artifact(tmp_path)
    desc = json.loads(
        invoke("inspect", path, "--json", "--module", "enc*", "--weight", "weight_hh*").stdout
    )
    assert {(w["module"], w["weight"]) for w in desc["weights"]} == {
        ("encoder", n)
        for n in ("weight_hh_l0", "weight_hh_l0_reverse", "weight_hh_l1", "weight_hh_l1_reverse")
    }
    ranked = json.loads(invoke("inspect", path, "--json", "--sort", "sqnr").stdout)["weights"]
    sqnrs = [w["sqnr_db"] for w in ranked]
    assert sqnrs == sorted(sqnrs)


def test_table_golden_output(tmp_path):
    path, _ = make_artifact(
        tmp_path,
        "version: 1\nmodules:\n  aux: {nonlinearity: relu}\n  context: {batch_first: true}\n",
    )
    desc = describe_artifact(path, module="[gd]*")
    console = Console(width=150, file=io.StringIO(), color_system=None, force_terminal=False)
    render_table(desc, console)
    text = console.file.getvalue()
    if os.environ.get("REFQ_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text()


def test_header_and_float_tensors(tmp_path):
    path, source = make_artifact(tmp_path)
    result = invoke("inspect", path, "--all")
    assert result.exit_code == 0
    assert f"source: {source.name} (state_dict), sha256 " in result.stdout
    assert "frontend.weight: F32 6x4x3" in result.stdout
    summary = invoke("inspect", path).stdout
    assert "float tensors kept as they were (list them with --all)" in summary


def test_inspect_reads_only_the_header_scales_and_zero_points(tmp_path, monkeypatch):
    from refq_cli.io import header

    path, _ = make_artifact(tmp_path)
    reads = []  # (start, end) of every read from the artifact

    class Recording(io.FileIO):
        def read(self, size=-1):
            start = self.tell()
            data = super().read(size)
            reads.append((start, start + len(data)))
            return data

    def recording_open(path, mode="r", opener=None):
        return Recording(path, mode, opener=opener)

    monkeypatch.setattr(header, "open", recording_open, raising=False)
    describe_artifact(path)
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    entries = json.loads(raw[8 : 8 + size])
    small = [n for n in entries if n.endswith(("_scale", "_zero_point"))]
    allowed = [(0, 8 + size)]  # the header, and the small tensors' bytes
    allowed += [tuple(8 + size + o for o in entries[n]["data_offsets"]) for n in small]
    assert len(reads) > len(small) > 0
    for start, end in reads:
        assert any(a <= start and end <= b for a, b in allowed), (start, end)


def test_inspect_imports_no_torch(tmp_path):
    path, _ = make_artifact(tmp_path)
    output, imported_torch = run_and_check_torch(["inspect", path])
    assert "weight_ih" in output and not imported_torch


def test_diff_of_equal_and_different_artifacts(tmp_path):
    a, _ = make_artifact(tmp_path, name="a.safetensors")
    b, _ = make_artifact(tmp_path, name="b.safetensors")
    same = invoke("inspect", "--diff", a, b)
    assert same.exit_code == 0 and "no differences" in same.stdout
    other_spec = MIXED.replace("qscheme: per_tensor_symmetric", "qscheme: per_channel_symmetric")
    other_spec = other_spec.replace(
        '  - {match: "encoder"', '  - {match: "enc*", skip: true}\n  - {match: "encoder"'
    )
    c, _ = make_artifact(tmp_path, other_spec, name="c.safetensors")
    result = invoke("inspect", "--diff", a, c, "--json")
    assert result.exit_code == 1
    changes = json.loads(result.stdout)["differences"]
    kinds = {
        (c["section"], c.get("module") or c.get("tensor"), c.get("field"), c["change"])
        for c in changes
    }
    assert ("modules", "encoder", None, "removed") in kinds
    assert ("tensors", "encoder.weight_ih_l0_scale", None, "removed") in kinds
    assert ("tensors", "encoder.weight_ih_l0", "dtype", "changed") in kinds
    assert ("modules", "gate", "weights.weight_hh.qscheme", "changed") in kinds
    assert ("tensors", "gate.weight_hh_scale", "shape", "changed") in kinds


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.write_text("not a model"), "not a safetensors file"),
        (
            lambda p: write_safetensors(p, {"w": torch.zeros(2)}, {}),
            "a safetensors file, but not a refq artifact .no format: refq.",
        ),
        (
            lambda p: write_safetensors(
                p, {"w": torch.zeros(2)}, {"format": "refq", "refq.format_version": "9"}
            ),
            "format version '9' is newer than this refq reads",
        ),
    ],
    ids=["text", "plain-safetensors", "newer-version"],
)
def test_files_that_are_not_artifacts(tmp_path, make, message):
    path = tmp_path / "x.safetensors"
    make(path)
    result = invoke("inspect", path)
    assert result.exit_code == 2
    assert result.output.startswith("refq: error: ") and len(result.output.splitlines()) == 1
    assert re.search(message, result.output)


def test_truncated_artifacts(tmp_path):
    path, _ = make_artifact(tmp_path)
    data = path.read_bytes()
    for cut in (4, 100, len(data) - 10):
        path.write_bytes(data[:cut])
        result = invoke("inspect", path)
        assert result.exit_code == 2, (cut, result.output)
        assert len(result.output.splitlines()) == 1


def test_verify_passes_against_its_checkpoint_and_gates(tmp_path):
    path, source = make_artifact(tmp_path)
    result = invoke("verify", path, "--against", source, "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["modules"]
    assert len(rows) == 6 and all(r["output_sqnr_db"] > 20 for r in rows)
    gated = invoke("verify", path, "--against", source, "--min-sqnr", "200")
    assert gated.exit_code == 1 and "quality gate" in gated.output


def test_verify_matches_the_conversion_report(tmp_path):
    path, source = make_artifact(tmp_path)
    conversion = convert(source, tmp_path / "a.refq.safetensors.yaml", tmp_path / "again.st")
    verified = json.loads(invoke("verify", path, "--against", source, "--json").stdout)
    expected = {m["path"]: m["output_sqnr_db"] for m in conversion.report["modules"]}
    assert {m["path"]: m["output_sqnr_db"] for m in verified["modules"]} == expected


def test_verify_against_another_checkpoint_fails(tmp_path):
    path, _ = make_artifact(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    result = invoke("verify", path, "--against", write(other, "pt", seed=1))
    assert result.exit_code == 1 and "sha256 differs" in result.output


def test_a_missing_artifact_or_a_folder_is_named_as_such(tmp_path):
    missing = invoke("inspect", tmp_path / "nope.refq.safetensors")
    assert missing.exit_code == 2
    assert missing.stderr.strip().endswith("nope.refq.safetensors: no such artifact file")
    folder = invoke("inspect", tmp_path)
    assert folder.stderr.strip().endswith(": is a directory, not an artifact file")


def test_a_filter_that_matches_no_weight_is_an_error_naming_what_is_there(tmp_path):
    path, _ = make_artifact(tmp_path)
    result = invoke("inspect", path, "--module", "zzz")
    assert result.exit_code == 2
    assert f"--module zzz: matches no quantized weight of {path}; it has " in result.stderr
    assert "decoder.cell.weight_ih" in result.stderr


def test_inspect_shows_the_gate_an_artifact_was_converted_with(tmp_path):
    source = write(tmp_path, "pt")
    (tmp_path / "q.yaml").write_text(MIXED)
    out = tmp_path / "m.refq.safetensors"
    assert (
        invoke(
            "convert", source, "-q", tmp_path / "q.yaml", "-o", out, "--min-sqnr", "200"
        ).exit_code
        == 1
    )
    rejected = tmp_path / "m.refq.rejected.safetensors"
    shown = invoke("inspect", rejected)
    assert "gate: minimum SQNR 200 dB, MISSED: an artifact set aside, not accepted" in shown.stdout
    assert json.loads(invoke("inspect", rejected, "--json").stdout)["gate"] == {
        "min_sqnr": 200.0,
        "passed": False,
    }
    assert (
        invoke("convert", source, "-q", tmp_path / "q.yaml", "-o", out, "--min-sqnr", "1").exit_code
        == 0
    )
    assert "gate: minimum SQNR 1 dB, passed" in invoke("inspect", out).stdout
    assert (
        invoke("convert", source, "-q", tmp_path / "q.yaml", "-o", tmp_path / "plain.st").exit_code
        == 0
    )
    assert json.loads(invoke("inspect", tmp_path / "plain.st", "--json").stdout)["gate"] is None
