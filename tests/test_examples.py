"""The bundled example and demo keep working."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_bundled_checkpoint_is_a_plain_state_dict():
    state = torch.load(EXAMPLES / "models" / "example.pt", weights_only=True)
    assert {"encoder.weight_ih_l1", "decoder.weight_hh", "head.weight"} <= set(state)


def test_python_api_example_converts_and_stays_close_to_float():
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "python_api.py")],
        capture_output=True,
        text=True,
        check=True,
        env={"COLUMNS": "120", "PATH": ""},
    )
    assert "QuantizedLSTM(Reference)" in result.stdout
    assert "QuantizedGRUCell(Reference)" in result.stdout
    sqnr = float(re.search(r"SQNR = ([\d.]+) dB", result.stdout).group(1))
    assert sqnr > 30


def run_example(name: str) -> str:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": ""},
    ).stdout


def test_the_convert_example_converts_verifies_and_runs_the_quantized_model():
    out = run_example("convert_and_run.py")
    assert re.search(
        r"wrote .*example\.refq\.safetensors and example\.refq\.report\.md: 6 weights", out
    )
    assert "per_channel_symmetric qint8" in out
    assert "verify: source matches True, gate passed True" in out
    same = int(re.search(r"same top class as the float model for (\d)/8", out).group(1))
    assert same >= 7


def test_the_batch_example_runs_every_shard_of_the_ci_manifest():
    out = run_example("batch_manifest.py")
    assert re.search(r"^(converted|skipped) +\S*example\.pt -> \S*out/ci/example", out, re.M)
    assert out.rstrip().endswith("jobs: 1, failed: 0")


def test_the_deploy_example_exports_whole_models_that_onnxruntime_runs():
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    out = run_example("deploy_onnx.py")
    found = {
        m["name"]: m
        for m in re.finditer(
            r"^(?P<name>[\w-]+): .* (?P<dq>\d+) DequantizeLinear, (?P<ints>\d+) integer "
            r"initializers; onnxruntime vs PyTorch max abs diff (?P<diff>\S+) "
            r"\((?P<fused>\S+) with onnxruntime's integer fusions\)$",
            out,
            re.M,
        )
    }
    assert set(found) == {"silero-vad", "tagger"}, out
    # the LSTMCell's two weights; the tagger's 2 layers x 2 directions x 3 weights
    assert int(found["silero-vad"]["dq"]) == 2 and int(found["tagger"]["dq"]) == 12
    for m in found.values():
        assert int(m["ints"]) >= int(m["dq"])
        assert float(m["diff"]) <= 1e-5
        assert float(m["fused"]) <= 1e-3  # int8 activations: still close
