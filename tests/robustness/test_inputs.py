"""Untrusted and broken checkpoints: refused with one line and exit 2, never run, never crash."""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from refq_cli.pipeline.artifact import load_artifact
from tests.checkpoints import write
from tests.scripts import run_refq

SPEC = "version: 1\n"


def convert(tmp_path, source, *extra, env=None):
    spec = tmp_path / "q.yaml"
    if not spec.exists():
        spec.write_text(SPEC)
    return run_refq(
        "convert",
        source,
        "-q",
        spec,
        "-o",
        tmp_path / "out.refq.safetensors",
        "--force",
        *extra,
        env=env,
    )


def assert_refused(result, pattern):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert re.search(pattern, lines[0]), lines[0]


class RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {Path.cwd() / 'PWNED'}",))


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin"])
@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_code_running_pickles_are_refused_even_when_torch_is_told_otherwise(
    tmp_path, monkeypatch, suffix, zip_format
):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / f"evil{suffix}"
    torch.save(
        {"lstm.weight_ih": torch.zeros(4, 2), "boom": RunsCode()},
        path,
        _use_new_zipfile_serialization=zip_format,
    )
    result = convert(tmp_path, path, env={"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"})
    assert_refused(result, r"refused to unpickle Python objects \(globals (posix|os)\.system\)")
    assert not (tmp_path / "PWNED").exists()


def test_a_pickled_module_needs_the_flag(tmp_path):
    assert_refused(
        convert(tmp_path, write(tmp_path, "pickle")),
        r"refused to unpickle .*pass --trust-code only for a file you trust",
    )


def test_truncated_and_bit_flipped_torch_files(tmp_path):
    good = write(tmp_path, "pt").read_bytes()
    for n, cut in enumerate((10, len(good) // 3, len(good) - 100)):
        path = tmp_path / f"cut{n}.pt"
        path.write_bytes(good[:cut])
        assert_refused(convert(tmp_path, path), "cannot read the checkpoint")
    for n, at in enumerate((0, 40, len(good) // 2, len(good) - 30)):
        flipped = bytearray(good)
        flipped[at] ^= 0xFF
        path = tmp_path / f"flip{n}.pt"
        path.write_bytes(bytes(flipped))
        result = convert(tmp_path, path)
        assert result.returncode in (0, 2) and "Traceback" not in result.stderr, result.stderr
        if result.returncode == 2:
            assert len(result.stderr.strip().splitlines()) == 1


def safetensors_blob(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


BROKEN_SAFETENSORS = {
    "header-longer-than-file": struct.pack("<Q", 10_000) + b'{"a": 1}',
    "bad-json": struct.pack("<Q", 9) + b"{not json",
    "overlapping-offsets": safetensors_blob(
        {
            "w.weight_ih": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "w.weight_hh": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
        },
        b"\0" * 12,
    ),
    "trailing-bytes": safetensors_blob(
        {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8 + b"junk"
    ),
    "offsets-past-the-end": safetensors_blob(
        {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8
    ),
}


@pytest.mark.parametrize("blob", BROKEN_SAFETENSORS.values(), ids=BROKEN_SAFETENSORS.keys())
def test_broken_safetensors_files(tmp_path, blob):
    path = tmp_path / "m.safetensors"
    path.write_bytes(blob)
    assert_refused(convert(tmp_path, path), "not a valid .safetensors file|not a checkpoint")


def test_paths_that_are_not_files(tmp_path):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    assert_refused(convert(tmp_path, empty), "the file is empty")
    assert_refused(convert(tmp_path, tmp_path), "is a directory")
    assert_refused(convert(tmp_path, tmp_path / "missing.pt"), "no such checkpoint file")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file(tmp_path):
    path = write(tmp_path, "pt")
    path.chmod(0)
    assert_refused(convert(tmp_path, path), "cannot read the checkpoint: Permission denied")


def state_with(**changes):
    torch.manual_seed(0)
    state = nn.LSTM(3, 4).state_dict()
    return {**state, **changes}


@pytest.mark.parametrize(
    ("state", "pattern"),
    [
        (
            state_with(weight_hh_l0=torch.full((16, 4), float("nan"))),
            "<root>.weight_hh_l0 holds NaN or infinite values",
        ),
        (
            state_with(weight_ih_l0=torch.full((16, 3), float("inf"))),
            "<root>.weight_ih_l0 holds NaN or infinite values",
        ),
        (
            state_with(weight_hh_l0=torch.zeros(16, 4, dtype=torch.int32)),
            "weight_hh_l0 has dtype int32; recurrent weights must be float16, bfloat16, float32",
        ),
    ],
    ids=["nan", "inf", "integer"],
)
def test_weights_that_cannot_be_quantized(tmp_path, state, pattern):
    path = tmp_path / "m.pt"
    torch.save(state, path)
    assert_refused(convert(tmp_path, path), pattern)


def test_an_all_zero_weight_converts(tmp_path):
    path = tmp_path / "m.pt"
    torch.save(state_with(weight_hh_l0=torch.zeros(16, 4)), path)
    result = convert(tmp_path, path)
    assert result.returncode == 0, result.stderr
    ref = load_artifact(tmp_path / "out.refq.safetensors").modules["<root>"]
    assert torch.equal(ref.get_weight("weight_hh_l0"), torch.zeros(16, 4))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_dtypes_convert_and_record_their_dtype(tmp_path, dtype):
    path = tmp_path / "m.pt"
    torch.save({k: v.to(dtype) for k, v in state_with().items()}, path)
    assert convert(tmp_path, path).returncode == 0
    artifact = load_artifact(tmp_path / "out.refq.safetensors")
    info = artifact.metadata["refq.modules"][""]
    assert info["float_dtype"] == str(dtype).removeprefix("torch.")
    assert artifact.modules["<root>"].weight_ih_l0.dtype == dtype


def test_non_contiguous_and_shared_tensors_convert(tmp_path):
    torch.manual_seed(0)
    base = torch.randn(16, 8)
    state = {
        "rnn.weight_ih_l0": base[:, ::2],
        "rnn.weight_hh_l0": base[:, 1::2],
        "rnn.bias_ih_l0": torch.zeros(16),
        "rnn.bias_hh_l0": torch.zeros(16),
        "tied.a": base,
        "tied.b": base,
    }
    path = tmp_path / "m.pt"
    torch.save(state, path)
    assert convert(tmp_path, path).returncode == 0
    safetensors_path = tmp_path / "m.safetensors"
    save_file({k: v.contiguous().clone() for k, v in state.items()}, str(safetensors_path))
    assert convert(tmp_path, safetensors_path).returncode == 0
