"""The conversion pipeline, the artifact it writes and reading it back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from refq_cli import reference
from refq_cli.errors import CheckpointError, SpecError
from refq_cli.pipeline.artifact import ArtifactError, load_artifact
from refq_cli.pipeline.convert import convert_checkpoint as convert
from refq_cli.pipeline.gate import Gate
from tests.checkpoints import Speech, speech_calibration, write

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PRESETS = sorted(p.name for p in CONFIGS.glob("*.yaml"))
FACTS = "modules:\n  aux: {nonlinearity: relu}\n  context: {batch_first: true}\n"


def spec_file(tmp_path, body="", name="q.yaml"):
    path = tmp_path / name
    path.write_text("version: 1\n" + body + FACTS)
    return path


def preset_with_facts(tmp_path, preset):
    path = tmp_path / preset
    path.write_text((CONFIGS / preset).read_text() + FACTS)
    return path


def outputs(module, x):
    with torch.no_grad():
        out = module(x)
    out = out if isinstance(out, tuple) else (out,)
    return [t for item in out for t in (item if isinstance(item, tuple) else (item,))]


def probe(info):
    if info.float_type.endswith("Cell"):
        return torch.randn(3, info.config["input_size"])
    return torch.randn(5, 3, info.config["input_size"])


@pytest.mark.parametrize("preset", PRESETS)
def test_artifact_round_trip_is_bit_identical(tmp_path, preset):
    path = tmp_path / "model.refq.safetensors"
    calibration = speech_calibration(tmp_path) if "gptq" in preset else None
    conversion = convert(
        write(tmp_path, "pt"), preset_with_facts(tmp_path, preset), path, calibration=calibration
    )
    artifact = load_artifact(path)
    assert set(artifact.modules) == set(conversion.modules)
    torch.manual_seed(0)
    for module_path, converted in conversion.modules.items():
        loaded = artifact.modules[module_path]
        assert type(loaded) is type(converted.reference)
        x = probe(converted.info)
        for a, b in zip(outputs(loaded, x), outputs(converted.reference, x), strict=True):
            assert torch.equal(a, b)
    assert sorted(artifact.tensors) == [
        "frontend.bias",
        "frontend.weight",
        "head.bias",
        "head.weight",
    ]


def test_load_artifact_is_on_the_package():
    import refq_cli

    assert refq_cli.load_artifact is load_artifact


def test_artifact_layout_and_metadata(tmp_path):
    path = tmp_path / "a.safetensors"
    convert(write(tmp_path, "pt"), spec_file(tmp_path), path)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        assert f.get_tensor("encoder.weight_hr_l1_reverse").dtype == torch.int8
        assert f.get_tensor("encoder.weight_hr_l1_reverse_scale").shape == (3,)
        assert f.get_tensor("encoder.weight_hr_l1_reverse_zero_point").dtype == torch.int32
        assert f.get_tensor("encoder.bias_ih_l0").dtype == torch.float32
    assert meta["format"] == "refq" and meta["refq.format_version"] == "1"
    modules = json.loads(meta["refq.modules"])
    assert modules["encoder"]["config"]["proj_size"] == 3
    assert modules["aux"]["config"]["nonlinearity"] == "relu"
    assert modules["context"]["config"]["batch_first"] is True
    assert modules["gate"]["weights"]["weight_hh"]["qscheme"] == "per_channel_affine"
    assert json.loads(meta["refq.source"])["format"] == "state_dict"
    assert json.loads(meta["refq.spec"])["version"] == 1
    assert set(json.loads(meta["refq.producer"])) == {"refq", "torch"}


@pytest.mark.parametrize("kind", ["pt", "safetensors", "torchscript", "nested-model"])
def test_same_input_and_spec_give_byte_identical_artifacts(tmp_path, kind):
    source = write(tmp_path, kind)
    spec = spec_file(tmp_path, "") if kind != "torchscript" else tmp_path / "ts.yaml"
    if kind == "torchscript":
        spec.write_text("version: 1\n")
    blobs = []
    for run in range(2):
        path = tmp_path / f"run{run}.safetensors"
        conversion = convert(source, spec, path)
        blobs.append(path.read_bytes())
        report = conversion.report
        assert report["totals"].pop("seconds") >= 0  # the one field that may differ
        blobs.append(json.dumps(report, sort_keys=True).encode())
    assert blobs[0] == blobs[2] and blobs[1] == blobs[3]


def test_apply_to_swaps_modules_into_the_users_model(tmp_path):
    path = tmp_path / "a.safetensors"
    conversion = convert(write(tmp_path, "pt"), spec_file(tmp_path), path)
    torch.manual_seed(123)  # different float weights: apply_to must load the artifact's
    model = Speech()
    model.aux = nn.RNN(6, 4, nonlinearity="relu")
    model.context = nn.GRU(6, 5, bias=False, batch_first=True)
    load_artifact(path).apply_to(model)
    assert isinstance(model.encoder, reference.LSTM) and model.encoder.proj_size == 3
    assert isinstance(model.decoder.cell, reference.LSTMCell)
    assert torch.equal(model.head.weight, conversion.checkpoint.tensors["head.weight"])
    x = torch.randn(4, 3, 6)
    ref = conversion.modules["encoder"].reference
    for a, b in zip(outputs(model.encoder, x), outputs(ref, x), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda m: setattr(m, "context", nn.GRU(6, 5, bias=False)),
            "context differs from the artifact: batch_first: model has False, artifact has True",
        ),
        (
            lambda m: setattr(m, "encoder", nn.LSTM(6, 8, num_layers=2, bidirectional=True)),
            "proj_size: model has 0, artifact has 3",
        ),
        (
            lambda m: setattr(m, "gate", nn.LSTMCell(6, 5)),
            "type: model has LSTMCell, artifact has GRUCell",
        ),
        (lambda m: delattr(m, "decoder"), "the model has no module at 'decoder.cell'"),
        (
            lambda m: setattr(m, "head", nn.Linear(7, 3)),
            r"tensor 'head.weight' has shape \(2, 7\), the model's \(3, 7\)",
        ),
        (lambda m: m.double(), "dtype: model has float64, artifact has float32"),
    ],
    ids=["batch_first", "proj_size", "type", "missing", "other-tensor-shape", "dtype"],
)
def test_apply_to_names_what_differs(tmp_path, change, message):
    path = tmp_path / "a.safetensors"
    convert(write(tmp_path, "pt"), spec_file(tmp_path), path)
    model = Speech()
    model.aux = nn.RNN(6, 4, nonlinearity="relu")
    model.context = nn.GRU(6, 5, bias=False, batch_first=True)
    change(model)
    before = {name: type(m) for name, m in model.named_modules()}
    with pytest.raises(ArtifactError, match=message):
        load_artifact(path).apply_to(model)
    assert {name: type(m) for name, m in model.named_modules()} == before  # left as it was


def test_skipped_modules_and_float_weights_stay_float(tmp_path):
    body = (
        "rules:\n  - {match: 'dec*', skip: true}\n  - match: gate\n    weights:\n"
        "      weight_hh: {qscheme: none}\n"
    )
    path = tmp_path / "a.safetensors"
    conversion = convert(write(tmp_path, "pt"), spec_file(tmp_path, body), path)
    assert conversion.modules["decoder.cell"].reference is None
    tensors = load_file(path)
    assert tensors["decoder.cell.weight_ih"].dtype == torch.float32
    assert "decoder.cell.weight_ih_scale" not in tensors
    assert tensors["gate.weight_hh"].dtype == torch.float32
    assert tensors["gate.weight_ih"].dtype == torch.int8
    skipped = [m for m in conversion.report["modules"] if m["skipped"]]
    assert [m["path"] for m in skipped] == ["decoder.cell"]


def test_report_contents(tmp_path):
    path = tmp_path / "a.safetensors"
    conversion = convert(write(tmp_path, "pt"), spec_file(tmp_path), path)
    report = conversion.report
    weights = {(w["module"], w["weight"]): w for w in report["weights"]}
    # encoder: layers x directions x (ih, hh, hr); five more modules with ih and hh each
    assert len(weights) == 2 * 2 * 3 + 5 * 2
    w = weights[("encoder", "weight_hh_l0")]
    assert w["sqnr_db"] > 30 and 0 <= w["clipped_fraction"] < 0.01
    assert w["scale_min"] <= w["scale_max"] and w["zero_point_min"] == w["zero_point_max"] == 0
    module = next(m for m in report["modules"] if m["path"] == "encoder")
    assert len(module["hidden_error_per_step"]) == 16
    assert module["output_sqnr_db"] > 20
    totals = report["totals"]
    assert totals["float_bytes"] > totals["quantized_bytes"] > 0
    assert totals["quantized_bytes"] == sum(
        t.numel() * t.element_size() for t in load_file(path).values()
    )
    weights = conversion.report["weights"]
    assert not Gate(1000.0).judge(weights)["passed"] and Gate(0.0).judge(weights)["passed"]


def test_calibration_inputs_replace_the_random_probe(tmp_path):
    calibration = tmp_path / "calib.pt"
    torch.save({"gate": torch.randn(7, 2, 6), "encoder": torch.randn(9, 2, 6)}, calibration)
    conversion = convert(
        write(tmp_path, "pt"), spec_file(tmp_path), tmp_path / "a.st", calibration=calibration
    )
    rows = {m["path"]: m for m in conversion.report["modules"]}
    assert rows["gate"]["probe"] == "calibration" and rows["gate"]["probe_shape"] == [7, 2, 6]
    assert len(rows["encoder"]["hidden_error_per_step"]) == 9
    assert rows["aux"]["probe"] == "random"


def test_spec_is_checked_before_the_checkpoint_is_read(tmp_path):
    bad_spec = tmp_path / "bad.yaml"
    bad_spec.write_text("version: 1\ndefaults: {dtype: qint16}\n")
    with pytest.raises(SpecError, match=r"bad\.yaml:2:19"):
        convert(tmp_path / "does-not-exist.pt", bad_spec, tmp_path / "a.st")


def test_a_checkpoint_without_recurrent_modules(tmp_path):
    path = tmp_path / "linear.pt"
    torch.save(nn.Linear(3, 3).state_dict(), path)
    with pytest.raises(CheckpointError, match="no recurrent module found"):
        convert(path, spec_file(tmp_path, "").with_name("q.yaml"), tmp_path / "a.st")
    assert not (tmp_path / "a.st").exists()


def test_is_decomposed_reaches_the_modules(tmp_path):
    spec = tmp_path / "d.yaml"
    spec.write_text("version: 1\nis_decomposed: true\nmodules:\n  aux: {nonlinearity: relu}\n")
    conversion = convert(write(tmp_path, "pt"), spec, tmp_path / "a.st")
    assert all(m.reference.is_decomposed for m in conversion.modules.values())


def test_reading_files_that_are_not_refq_artifacts(tmp_path):
    from safetensors.torch import save_file

    from refq_cli.io.safetensors_writer import write_safetensors

    text = tmp_path / "text.safetensors"
    text.write_text("hello")
    with pytest.raises(ArtifactError, match="not a safetensors file"):
        load_artifact(text)
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(ArtifactError, match="not a refq artifact"):
        load_artifact(plain)
    newer = tmp_path / "newer.safetensors"
    write_safetensors(newer, {"w": torch.zeros(2)}, {"format": "refq", "refq.format_version": "2"})
    with pytest.raises(ArtifactError, match="format version '2' is newer than this refq reads"):
        load_artifact(newer)


def test_our_safetensors_writer_reads_back_with_the_library(tmp_path):
    from safetensors.torch import load_file

    from refq_cli.io.safetensors_writer import write_safetensors

    tensors = {
        "b": torch.arange(5, dtype=torch.int8),
        "a": torch.randn(3, 2).t(),
        "s": torch.tensor(1.5),
        "e": torch.zeros(0, 4),
        "h": torch.ones(3).half(),
    }
    path = tmp_path / "t.safetensors"
    write_safetensors(path, tensors, {"k": "v"})
    loaded = load_file(str(path))
    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        assert torch.equal(loaded[name], t)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_float_modules_keep_cudnns_layout_after_the_layer_by_layer_probe(tmp_path):
    conversion = convert(
        write(tmp_path, "pt"), spec_file(tmp_path), tmp_path / "m.refq.safetensors", device="cuda"
    )
    checked = 0
    for converted in conversion.modules.values():
        module = converted.float_module
        if isinstance(module, nn.RNNBase):
            storages = {w.untyped_storage().data_ptr() for w in module._flat_weights}
            assert len(storages) == 1, f"{converted.info.path}: weights in {len(storages)} buffers"
            checked += 1
    assert checked == 3
