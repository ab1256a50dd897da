"""The bundled example and demo keep working."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

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
