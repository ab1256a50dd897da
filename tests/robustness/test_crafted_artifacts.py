"""Artifacts refq did not write: what `inspect` shows, `load_artifact` runs, and both refuse
the same files with one line (found by a hostile review)."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest
import torch
from torch import nn

from refq_cli.errors import ArtifactError
from refq_cli.pipeline.artifact import load_artifact
from refq_cli.pipeline.convert import convert_checkpoint as convert
from tests.scripts import run_refq


def artifact(tmp_path: Path, spec: str = "version: 1\n") -> Path:
    model = nn.Module()
    model.cell = nn.GRUCell(3, 4)
    source = tmp_path / "m.pt"
    torch.save(model.state_dict(), source)
    (tmp_path / "q.yaml").write_text(spec)
    out = tmp_path / "a.refq.safetensors"
    convert(source, tmp_path / "q.yaml", out)
    return out


def rewrite(path: Path, change) -> None:
    """Apply ``change(header, data)`` to the file's JSON header and data (a bytearray)."""
    raw = path.read_bytes()
    size = struct.unpack("<Q", raw[:8])[0]
    header, data = json.loads(raw[8 : 8 + size]), bytearray(raw[8 + size :])
    change(header, data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + bytes(data))


def both_refuse(path: Path, pattern: str) -> None:
    """``refq inspect``, ``inspect --json`` and ``load_artifact`` refuse it in one line."""
    for args in ((), ("--json",)):
        result = run_refq("inspect", path, *args)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, result.stderr
        assert re.search(pattern, lines[0]), lines[0]
    with pytest.raises(ArtifactError, match=pattern):
        load_artifact(path)


def test_metadata_nested_too_deep_is_refused(tmp_path):
    """A list 500 deep in refq.source crashed `inspect --json` with a RecursionError."""
    path = artifact(tmp_path)

    def deepen(header, data):
        source = json.loads(header["__metadata__"]["refq.source"])
        source["extra"] = json.loads("[" * 500 + "]" * 500)
        header["__metadata__"]["refq.source"] = json.dumps(source)

    rewrite(path, deepen)
    both_refuse(path, r"metadata refq.source nests deeper than 32 levels")


@pytest.mark.parametrize(
    ("tensor", "dtype"), [("cell.weight_ih_scale", "I32"), ("cell.weight_ih_zero_point", "F32")]
)
def test_scales_and_zero_points_of_another_dtype_are_refused(tmp_path, tensor, dtype):
    """A BOOL or BF16 scale ran in load_artifact but was refused by inspect; a U64 zero point
    of 2**64-1 wrapped to -1 and passed."""
    path = artifact(tmp_path)
    rewrite(path, lambda header, data: header[tensor].update(dtype=dtype))
    both_refuse(path, rf"tensor '{tensor}' is '{dtype}', but refq stores it as")


def test_a_nan_scale_is_refused_by_inspect_as_by_load_artifact(tmp_path):
    path = artifact(tmp_path)

    def nan_scale(header, data):
        start = header["cell.weight_ih_scale"]["data_offsets"][0]
        data[start : start + 4] = struct.pack("<f", float("nan"))

    rewrite(path, nan_scale)
    result = run_refq("inspect", path)
    assert result.returncode == 2, result.stdout
    assert "cell.weight_ih_scale' holds a value that is not positive and finite" in result.stderr
    with pytest.raises(ArtifactError, match="scale must be positive and finite"):
        load_artifact(path)


def test_codes_outside_the_recorded_range_are_refused(tmp_path):
    """int4 codes of 100 ran, and the module's weight then differed 16x from what its forward
    pass used."""
    path = artifact(tmp_path, "version: 1\ndefaults: {dtype: int4}\n")

    def big_code(header, data):
        data[header["cell.weight_ih"]["data_offsets"][0]] = 100

    rewrite(path, big_code)
    with pytest.raises(
        ArtifactError, match=r"'cell.weight_ih' holds codes outside its range -8..7"
    ):
        load_artifact(path)
