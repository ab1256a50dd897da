"""describe_artifact: what refq inspect shows of a converted artifact, read back from its file."""

from __future__ import annotations

import statistics

import pytest
from safetensors import safe_open

import refq_cli
from refq_cli.pipeline.convert import convert_checkpoint as convert
from refq_cli.pipeline.inspect import describe_artifact
from tests.checkpoints import write

SPEC = """\
version: 1
rules:
  - {match: "encoder", qscheme: per_tensor_affine, dtype: quint8}
  - {match: "gate", qscheme: per_channel_affine, dtype: quint8}
  - {match: "tanh_cell", qscheme: per_tensor_symmetric}
  - {match: "aux", skip: true}
modules:
  aux: {nonlinearity: relu}
  context: {batch_first: true}
"""
MODULES = {  # the converted modules of tests.checkpoints.Speech and their types
    "context": "GRU",
    "decoder.cell": "LSTMCell",
    "encoder": "LSTM",
    "gate": "GRUCell",
    "tanh_cell": "RNNCell",
}

ENCODER = {  # a bidirectional two-layer LSTM with projections
    ("encoder", f"weight_{kind}_l{layer}{direction}")
    for kind in ("ih", "hh", "hr")
    for layer in (0, 1)
    for direction in ("", "_reverse")
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """An artifact of every recurrent module but a skipped one, and its conversion."""
    tmp_path = tmp_path_factory.mktemp("inspect")
    spec = tmp_path / "q.yaml"
    spec.write_text(SPEC)
    path = tmp_path / "model.refq.safetensors"
    return path, convert(write(tmp_path, "pt"), spec, path)


def stored(path):
    """Every tensor of the artifact as a flat list of numbers, read by safetensors."""
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k).reshape(-1).tolist() for k in f.keys()}  # noqa: SIM118


def summary(values):
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def test_one_row_per_quantized_weight_with_its_parameters(converted):
    path, conversion = converted
    desc = describe_artifact(path)
    tensors = stored(path)
    report = {(w["module"], w["weight"]): w for w in conversion.report["weights"]}
    rows = {(r["module"], r["weight"]): r for r in desc["weights"]}
    assert len(rows) == len(desc["weights"]) and set(rows) == set(report)
    assert {module for module, _ in rows} == set(MODULES)  # not the skipped aux
    for (module, weight), row in rows.items():
        expected = report[(module, weight)]
        key = f"{module}.{weight}"
        assert row["module_type"] == MODULES[module]
        for field in ("shape", "dtype", "qscheme", "axis", "quant_min", "quant_max", "sqnr_db"):
            assert row[field] == expected[field], (key, field)
        assert row["scale"] == summary(tensors[key + "_scale"]), key
        assert row["zero_point"] == summary(tensors[key + "_zero_point"]), key
        assert (row["scale"]["min"], row["scale"]["max"]) == (
            expected["scale_min"],
            expected["scale_max"],
        )
        assert "scales" not in row and "zero_points" not in row
    encoder = rows[("encoder", "weight_ih_l0")]
    assert (encoder["qscheme"], encoder["dtype"], encoder["axis"]) == (
        "per_tensor_affine",
        "quint8",
        None,
    )
    gate = rows[("gate", "weight_hh")]
    assert (gate["qscheme"], gate["axis"], gate["shape"]) == ("per_channel_affine", 0, [15, 5])
    assert gate["zero_point"]["min"] < gate["zero_point"]["max"]  # affine: one per channel
    assert rows[("tanh_cell", "weight_ih")]["zero_point"] == {"min": 0, "median": 0, "max": 0}


@pytest.mark.parametrize(
    ("module", "weight", "expected"),
    [
        ("enc*", "*", ENCODER),
        ("gate", "*", {("gate", "weight_ih"), ("gate", "weight_hh")}),
        ("*", "weight_hh", {(m, "weight_hh") for m in ("decoder.cell", "gate", "tanh_cell")}),
        ("[gt]*", "weight_i?", {("gate", "weight_ih"), ("tanh_cell", "weight_ih")}),
        ("decoder.*", "weight_hh*", {("decoder.cell", "weight_hh")}),
        ("aux", "*", set()),  # skipped: not in the artifact's modules
        ("nothing", "*", set()),
    ],
)
def test_filters_are_globs_on_module_and_weight(converted, module, weight, expected):
    path, _ = converted
    everything = describe_artifact(path)
    desc = describe_artifact(path, module=module, weight=weight)
    assert {(r["module"], r["weight"]) for r in desc["weights"]} == expected
    assert desc["totals"] == everything["totals"]  # totals are the whole file's
    assert desc["float_tensors"] == everything["float_tensors"]


def test_channels_lists_every_scale_and_zero_point(converted):
    path, _ = converted
    tensors = stored(path)
    rows = describe_artifact(path, channels=True)["weights"]
    for row in rows:
        key = f"{row['module']}.{row['weight']}"
        assert row["scales"] == tensors[key + "_scale"], key
        assert row["zero_points"] == tensors[key + "_zero_point"], key
        channels = row["shape"][0] if row["qscheme"].startswith("per_channel") else 1
        assert len(row["scales"]) == len(row["zero_points"]) == channels, key
    assert describe_artifact(path, channels=True, module="gate")["weights"][0]["scales"]


def test_totals_float_tensors_and_header(converted):
    path, conversion = converted
    desc = describe_artifact(path)
    with safe_open(str(path), "pt") as f:
        names = set(f.keys())
        nbytes = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in names)
    quantized = {f"{w['module']}.{w['weight']}" for w in conversion.report["weights"]}
    owned = {k + s for k in quantized for s in ("", "_scale", "_zero_point")}
    floats = [n for n in stored_offsets(path) if n in names - owned]  # in the file's order
    assert [t["name"] for t in desc["float_tensors"]] == floats
    assert "frontend.weight" in floats and "aux.weight_ih_l0" in floats  # skipped: kept float
    assert "encoder.bias_ih_l0" in floats  # biases stay float
    frontend = next(t for t in desc["float_tensors"] if t["name"] == "frontend.weight")
    assert frontend == {"name": "frontend.weight", "shape": [6, 4, 3], "dtype": "F32"}
    assert desc["totals"] == {
        "modules": len(MODULES),
        "quantized_weights": len(quantized),
        "float_tensors": len(floats),
        "tensor_bytes": nbytes,
        "file_bytes": path.stat().st_size,
    }
    assert desc["path"] == str(path) and desc["format_version"] == 1
    assert desc["source"] == conversion.report["source"]
    assert desc["source"]["name"] == "model.pt" and len(desc["source"]["sha256"]) == 64
    assert desc["producer"]["refq"] == refq_cli.__version__


def test_a_weight_kept_float_is_listed_with_the_float_tensors(tmp_path):
    # It was in neither list, while its bytes counted in tensor_bytes.
    spec = tmp_path / "q.yaml"
    spec.write_text(
        "version: 1\nrules:\n  - {match: gate, weights: {weight_hh: {qscheme: none}}}\n"
        "modules:\n  aux: {nonlinearity: relu}\n  context: {batch_first: true}\n"
    )
    path = tmp_path / "model.refq.safetensors"
    convert(write(tmp_path, "pt"), spec, path)
    desc = describe_artifact(path)
    floats = {t["name"]: t for t in desc["float_tensors"]}
    assert "gate.weight_hh" in floats and floats["gate.weight_hh"]["dtype"] == "F32"
    assert ("gate", "weight_hh") not in {(w["module"], w["weight"]) for w in desc["weights"]}
    listed = {*floats, *(f"{w['module']}.{w['weight']}" for w in desc["weights"])}
    with safe_open(path, "pt") as f:
        names = f.keys()
    for name in names:  # every tensor is shown, as a weight, its parameters or a float
        assert name in listed or name.removesuffix("_scale").removesuffix("_zero_point") in listed


def test_rows_come_in_the_order_the_artifact_stores_them(converted):
    # The table was alphabetical (the metadata's sorted JSON keys) while its help says "as
    # stored": weight_hh before weight_ih, modules by name.
    path, conversion = converted
    desc = describe_artifact(path)
    stored_order = [(w["module"], w["weight"]) for w in conversion.report["weights"]]
    assert [(w["module"], w["weight"]) for w in desc["weights"]] == stored_order
    assert stored_order != sorted(stored_order)  # the case the old table got wrong
    in_file = stored_offsets(path)
    floats = [t["name"] for t in desc["float_tensors"]]
    assert floats == [n for n in in_file if n in floats]


def stored_offsets(path):
    """Tensor names in the order of their bytes in the file."""
    import json
    import struct

    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return sorted(header, key=lambda n: header[n]["data_offsets"][0])
