"""``refq export``: an artifact's modules as ONNX files that onnxruntime runs as refq does, and
every way the command refuses (nothing written then)."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

import refq_cli
from refq_cli.cli.app import app
from refq_cli.deploy.onnx_files import file_names, file_stem
from refq_cli.errors import ExportError
from tests.scripts import run_refq

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "models"


def cli(*args: object) -> SimpleNamespace:
    """``refq ARGS`` in this process (a fresh Python costs seconds): exit code and streams."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    return SimpleNamespace(returncode=result.exit_code, stdout=result.stdout, stderr=result.stderr)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "example.refq.safetensors"
    refq_cli.convert(EXAMPLE / "example.pt", EXAMPLE / "example.yaml", out)
    return out


def affine_artifact(tmp_path: Path) -> Path:
    spec = {"version": 1, "defaults": {"dtype": "quint8", "qscheme": "per_tensor_affine"}}
    out = tmp_path / "affine.refq.safetensors"
    refq_cli.convert(EXAMPLE / "example.pt", spec, out)
    return out


def run_model(path: Path, feeds: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [
        torch.from_numpy(o) for o in session.run(None, {k: v.numpy() for k, v in feeds.items()})
    ]


def test_every_module_runs_in_onnxruntime_as_the_artifact_does(artifact, tmp_path):
    result = cli("export", artifact, "-o", tmp_path / "onnx", "--json")
    assert result.returncode == 0, result.stderr
    models = {m["module"]: m for m in json.loads(result.stdout)["models"]}
    modules = refq_cli.load_artifact(artifact).modules
    assert set(models) == set(modules)
    gen = torch.Generator().manual_seed(0)
    for name, module in modules.items():
        model = onnx.load(models[name]["path"])
        dequantized = [n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"]
        integer = {i.name for i in model.graph.initializer if i.data_type != onnx.TensorProto.FLOAT}
        assert dequantized and set(dequantized) <= integer
        cell = isinstance(module, torch.nn.RNNCellBase)
        batch = 3
        x = torch.randn(batch, module.input_size, generator=gen)
        if not cell:
            x = torch.randn(9, batch, module.input_size, generator=gen)
            if module.batch_first:
                x = x.transpose(0, 1).contiguous()
        layers = 1 if cell else module.num_layers * (1 + module.bidirectional)
        state = (batch,) if cell else (layers, batch)
        h = torch.randn(*state, getattr(module, "proj_size", 0) or module.hidden_size)
        feeds = {"input": x, "h_0": h}
        hx: object = h
        if module.mode == "LSTM":
            feeds["c_0"] = torch.randn(*state, module.hidden_size)
            hx = (h, feeds["c_0"])
        with torch.no_grad():
            want = torch.utils._pytree.tree_leaves(module(x, hx))
        got = run_model(Path(models[name]["path"]), feeds)
        assert len(got) == len(want)
        for a, b in zip(got, want, strict=True):
            assert a.shape == b.shape
            assert float((a - b).abs().max()) <= 1e-5


def test_models_refq_wrote_are_replaced_and_other_files_only_with_force(artifact, tmp_path):
    out = tmp_path / "onnx"
    assert cli("export", artifact, "-o", out).returncode == 0
    again = cli("export", artifact, "-o", out)
    assert again.returncode == 0, again.stderr
    (out / "encoder.onnx").write_bytes(b"someone else's model")
    refused = cli("export", artifact, "-o", out)
    assert refused.returncode == 2
    assert "--out-dir" in refused.stderr and "encoder.onnx" in refused.stderr
    assert "--force" in refused.stderr
    assert (out / "encoder.onnx").read_bytes() == b"someone else's model"
    assert cli("export", artifact, "-o", out, "--force").returncode == 0
    onnx.checker.check_model(onnx.load(out / "encoder.onnx"))


def test_the_artifact_is_never_written_over(artifact, tmp_path):
    named_like_a_model = tmp_path / "encoder.onnx"
    named_like_a_model.write_bytes(artifact.read_bytes())
    result = cli("export", named_like_a_model, "-o", tmp_path, "--force")
    assert result.returncode == 2
    assert "artifact" in result.stderr
    assert named_like_a_model.read_bytes() == artifact.read_bytes()
    assert not (tmp_path / "decoder.onnx").exists()  # all or nothing


def test_tensorrt_refuses_zero_points_other_than_0_and_writes_nothing(tmp_path):
    affine = affine_artifact(tmp_path)
    result = cli("export", affine, "-o", tmp_path / "trt", "--target", "tensorrt")
    assert result.returncode == 2
    assert "TensorRT takes int8 or int4 weights with zero points of 0" in result.stderr
    assert "per_channel_symmetric" in result.stderr
    assert not (tmp_path / "trt").exists()
    assert cli("export", affine, "-o", tmp_path / "ort").returncode == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--format", "tflite"], "--format tflite: use onnx"),
        (["--opset", "12"], "--opset 12: refq writes ONNX opsets 13 to 23"),
        (["--opset", "24"], "--opset 24: refq writes ONNX opsets 13 to 23"),
        (["--target", "coreml"], "--target coreml: use one of onnxruntime, tensorrt"),
        (["--module", "nope"], "--module nope: matches no module"),
    ],
)
def test_bad_options_are_one_line_naming_the_flag(artifact, tmp_path, args, message):
    result = cli("export", artifact, "-o", tmp_path / "onnx", *args)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "onnx").exists()


def test_4_bit_weights_need_opset_21(tmp_path):
    spec = {"version": 1, "defaults": {"dtype": "int4", "qscheme": "per_channel_symmetric"}}
    four_bit = tmp_path / "int4.refq.safetensors"
    refq_cli.convert(EXAMPLE / "example.pt", spec, four_bit)
    result = cli("export", four_bit, "-o", tmp_path / "old", "--opset", "20")
    assert result.returncode == 2
    assert "module decoder: GRUCell.weight_ih: 4-bit weights need --opset 21" in result.stderr
    exported = refq_cli.export(four_bit, tmp_path / "new")
    model = onnx.load(exported["models"][0]["path"])
    assert onnx.TensorProto.INT4 in {i.data_type for i in model.graph.initializer}


def test_every_module_name_gets_a_file_of_its_own_inside_the_folder():
    names = ["../evil", "a/b", ".hidden", "x..y", "a\\b", "heads.déc", "speaker 1", "50%", "%25"]
    stems = [file_stem(n) for n in names]
    assert len(set(stems)) == len(names)  # never two modules in one file
    assert not any("/" in s or "\\" in s or s.startswith(".") for s in stems)
    assert file_stem("heads.déc") == "heads.d%C3%A9c" and file_stem("a/b") == "a%2Fb"
    assert file_stem("<root>") == "root"
    assert file_stem("encoder.layers.0-fw_1") == "encoder.layers.0-fw_1"


@pytest.mark.parametrize("names", [("heads.A", "heads.a"), ("<root>", "root")])
def test_two_modules_a_file_system_could_take_for_one_are_refused_naming_both(names):
    with pytest.raises(ExportError, match=rf"modules {names[0]} and {names[1]} would both"):
        file_names(names, Path("a.refq.safetensors"))


def test_modules_whose_names_are_not_plain_export_under_escaped_names(tmp_path):
    model = torch.nn.ModuleDict({"speaker 1": torch.nn.GRU(3, 4), "déc": torch.nn.LSTMCell(3, 4)})
    torch.save(model.state_dict(), tmp_path / "m.pt")
    spec = {"version": 1, "modules": {"speaker 1": {"batch_first": False, "dropout": 0.0}}}
    artifact = refq_cli.convert(tmp_path / "m.pt", spec, tmp_path / "m.refq.safetensors").output
    result = cli("export", artifact, "-o", tmp_path / "onnx")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "onnx").iterdir()) == [
        "d%C3%A9c.onnx",
        "speaker%201.onnx",
    ]
    (h,) = run_model(
        tmp_path / "onnx" / "speaker%201.onnx",
        {"input": torch.randn(5, 2, 3), "h_0": torch.zeros(1, 2, 4)},
    )[1:]
    assert h.shape == (1, 2, 4)


def test_without_the_onnx_extra_the_error_names_it(artifact, tmp_path):
    blocker = tmp_path / "no_onnx"
    blocker.mkdir()
    (blocker / "onnx.py").write_text("raise ImportError('No module named onnx')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(blocker), *sys.path])}
    result = run_refq("export", artifact, "-o", tmp_path / "onnx", env=env)
    assert result.returncode == 2
    assert "pip install 'refq[onnx]'" in result.stderr
    assert not (tmp_path / "onnx").exists()


def test_options_are_checked_before_the_artifact_is_read(tmp_path):
    result = cli("export", tmp_path / "missing.st", "-o", tmp_path / "o", "--opset", "12")
    assert result.returncode == 2 and "--opset 12: refq writes" in result.stderr
    empty = cli("export", tmp_path / "missing.st", "-o", "")
    assert empty.returncode == 2 and "give a folder's path" in empty.stderr


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"initial_states": "no"}, "initial_states='no': give True or False"),
        ({"force": 1}, "force=1: give True or False"),
        ({"module": None}, "module=None: give a glob"),
        ({"module": "*" * 1001}, "a glob of 1001 characters; at most 1000"),
        ({"target": "TensorRT"}, "target='TensorRT': use one of onnxruntime, tensorrt"),
        ({"opset": "21"}, "opset='21': refq writes ONNX opsets 13 to 23"),
    ],
)
def test_python_arguments_are_checked_as_the_cli_checks_flags(
    artifact, tmp_path, settings, message
):
    art = refq_cli.load_artifact(artifact)
    for export in (art.export_onnx, lambda out, **kw: refq_cli.export(artifact, out, **kw)):
        with pytest.raises(ExportError, match=re.escape(message)):
            export(tmp_path / "o", **settings)
    with pytest.raises(ExportError, match="out_dir='': give a folder's path"):
        art.export_onnx("")
    assert not (tmp_path / "o").exists()


def test_a_float16_artifact_exports_with_a_warning_that_the_model_computes_in_float32(tmp_path):
    model = torch.nn.Sequential(torch.nn.GRUCell(3, 4)).half()
    torch.save(model.state_dict(), tmp_path / "h.pt")
    artifact = refq_cli.convert(tmp_path / "h.pt", {"version": 1}, tmp_path / "h.st").output
    result = cli("export", artifact, "-o", tmp_path / "onnx")
    assert result.returncode == 0, result.stderr
    assert "refq: warning: module 0 computes in float16; its ONNX model computes in float32" in (
        result.stderr
    )
    onnx.checker.check_model(onnx.load(tmp_path / "onnx" / "0.onnx"))
