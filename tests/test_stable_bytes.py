"""Artifacts are stable bytes: the same input and spec give the same file, release after release.

The sha256 of artifacts of the bundled example, of silero-vad (safetensors and TorchScript) and
of every module type under every qscheme, dtype and observer are kept in
``tests/golden/artifact_sha256.json``. A change that alters one is a change of what refq writes:
it must be meant, and the golden file regenerated (``REFQ_UPDATE_GOLDEN=1 pytest
tests/test_stable_bytes.py``) in the same commit. Float rounding depends on torch's version and
on the CPU's vector unit, so the test runs where those are the golden file's.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from refq_cli.cli.app import app
from tests.checkpoints import silero_file

GOLDEN = Path(__file__).parent / "golden" / "artifact_sha256.json"
EXAMPLE = Path(__file__).parents[1] / "examples" / "models"

SPECS = {
    "per-tensor-affine-quint8-minmax": "defaults: {qscheme: per_tensor_affine, dtype: quint8}",
    "per-channel-affine-qint8-minmax": "defaults: {qscheme: per_channel_affine, dtype: qint8}",
    "per-tensor-symmetric-qint8-mse": "defaults: {qscheme: per_tensor_symmetric, observer: mse}",
    "per-channel-symmetric-int4-mse": (
        "defaults: {qscheme: per_channel_symmetric, dtype: int4, observer: mse}"
    ),
    "per-channel-affine-uint4-percentile": (
        "defaults: {qscheme: per_channel_affine, dtype: uint4, observer: percentile}"
    ),
    "per-channel-symmetric-qint32": "defaults: {qscheme: per_channel_symmetric, dtype: qint32}",
    "decomposed": "is_decomposed: true\ndefaults: {qscheme: per_channel_affine}",
    "rules-skip-none": (
        "rules:\n  - {match: cell_gru, skip: true}\n"
        "  - {match: seq_gru, weights: {weight_hh_l0: {qscheme: none}}}"
    ),
}
CALIBRATED = {  # converted with calibration inputs (calibration_inputs)
    "per-channel-symmetric-int4-output-gptq": (
        "defaults: {qscheme: per_channel_symmetric, dtype: int4, observer: output, rounding: gptq}"
    ),
    "per-tensor-affine-quint8-output": (
        "defaults: {qscheme: per_tensor_affine, dtype: quint8, observer: output}"
    ),
    "per-channel-affine-uint4-gptq": (
        "defaults: {qscheme: per_channel_affine, dtype: uint4, rounding: gptq}"
    ),
}
FACTS = "modules:\n  cell_rnn: {nonlinearity: relu}\n  seq_lstm: {batch_first: true}\n"


def every_module_type() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    modules = {
        "cell_rnn": torch.nn.RNNCell(6, 8, nonlinearity="relu"),
        "cell_lstm": torch.nn.LSTMCell(6, 8),
        "cell_gru": torch.nn.GRUCell(6, 8, bias=False),
        "seq_rnn": torch.nn.RNN(6, 8, num_layers=2, bidirectional=True),
        "seq_lstm": torch.nn.LSTM(6, 8, num_layers=2, proj_size=4, batch_first=True),
        "seq_gru": torch.nn.GRU(6, 8),
    }
    return torch.nn.ModuleDict(modules).state_dict()


def calibration_inputs(path: Path) -> Path:
    """Seeded inputs for every module of :func:`every_module_type`, in its layout."""
    gen = torch.Generator().manual_seed(1)
    names = ("cell_rnn", "cell_lstm", "cell_gru", "seq_rnn", "seq_lstm", "seq_gru")
    tensors = {n: torch.randn(10, 16, 6, generator=gen) for n in names}
    tensors["seq_lstm"] = tensors["seq_lstm"].transpose(0, 1).contiguous()  # batch_first
    save_file(tensors, path)
    return path


def artifacts(folder: Path) -> dict[str, Path]:
    """Convert every case into ``folder``; the artifact of each."""
    cases: dict[str, tuple[Path, Path, list[str]]] = {}
    model = folder / "types.pt"
    torch.save(every_module_type(), model)
    for name, body in SPECS.items():
        spec = folder / f"{name}.yaml"
        spec.write_text(f"version: 1\n{body}\n{FACTS}")
        cases[f"types-{name}"] = (model, spec, [])
    calibration = ["--calibration", str(calibration_inputs(folder / "calib.safetensors"))]
    for name, body in CALIBRATED.items():
        spec = folder / f"{name}.yaml"
        spec.write_text(f"version: 1\n{body}\n{FACTS}")
        cases[f"types-{name}"] = (model, spec, calibration)
    cases["example"] = (EXAMPLE / "example.pt", EXAMPLE / "example.yaml", [])
    cases["example-gate"] = (EXAMPLE / "example.pt", EXAMPLE / "example.yaml", ["--min-sqnr", "10"])
    plain = folder / "plain.yaml"
    plain.write_text("version: 1\n")
    cases["silero-safetensors"] = (silero_file("silero_vad_16k.safetensors"), plain, [])
    cases["silero-torchscript"] = (silero_file("silero_vad.jit"), plain, [])
    out = {}
    for name, (source, spec, extra) in cases.items():
        target = folder / f"{name}.refq.safetensors"
        args = ["convert", str(source), "-q", str(spec), "-o", str(target), "--quiet", *extra]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, (name, result.output)
        out[name] = target
    return out


def environment() -> dict[str, str]:
    cpu = torch.backends.cpu.get_cpu_capability()
    return {"torch": torch.__version__.split("+")[0], "cpu": cpu}


def test_artifacts_are_the_bytes_they_were(tmp_path):
    digests = {
        name: hashlib.sha256(path.read_bytes()).hexdigest()
        for name, path in artifacts(tmp_path).items()
    }
    if os.environ.get("REFQ_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps({**environment(), "sha256": digests}, indent=2) + "\n")
    golden = json.loads(GOLDEN.read_text())
    if {k: golden[k] for k in environment()} != environment():
        pytest.skip(f"golden digests are of {golden['torch']} on {golden['cpu']}")
    changed = sorted(n for n, digest in golden["sha256"].items() if digests.get(n) != digest)
    assert not changed, f"artifacts whose bytes changed: {changed}"
    assert set(digests) == set(golden["sha256"])
