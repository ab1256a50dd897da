"""The streaming safetensors writer: layout, order, sizes, faults and the kernel-copy fallback."""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from refq_cli.io.safetensors_writer import SafetensorsWriter, write_safetensors
from refq_cli.pipeline.artifact import ArtifactError

TENSORS = {
    "b.weight": torch.arange(12, dtype=torch.int8).reshape(3, 4),
    "a.scale": torch.tensor(0.5),
    "c.half": torch.randn(5, dtype=torch.float16),
    "d.empty": torch.zeros(0, 3),
}


def test_blocks_and_whole_tensors_give_the_same_file(tmp_path):
    write_safetensors(tmp_path / "whole.st", TENSORS, {"k": "v"})
    with SafetensorsWriter(tmp_path / "blocks.st") as writer:
        for name, tensor in TENSORS.items():
            writer.begin(name, tensor.dtype, tuple(tensor.shape))
            for row in tensor.reshape(-1, *tensor.shape[1:]) if tensor.dim() else [tensor]:
                writer.write(row)
            writer.end()
        writer.finish({"k": "v"})
    assert (tmp_path / "whole.st").read_bytes() == (tmp_path / "blocks.st").read_bytes()
    loaded = load_file(tmp_path / "blocks.st")
    assert list(loaded) == list(TENSORS)  # in the order they were written
    for name, tensor in TENSORS.items():
        assert torch.equal(loaded[name], tensor)
    with safe_open(str(tmp_path / "blocks.st"), "pt") as f:
        assert f.metadata() == {"k": "v"}


def test_data_is_stored_in_the_order_tensors_were_added(tmp_path):
    path = tmp_path / "a.st"
    write_safetensors(path, TENSORS, {})
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    data = raw[8 + size :]
    assert [k for k in header if k != "__metadata__"] == list(TENSORS)  # the header's order too
    end = 0
    for name, tensor in TENSORS.items():  # back to back, each right after the one added before
        nbytes = tensor.numel() * tensor.element_size()
        assert header[name]["data_offsets"] == [end, end + nbytes], name
        assert data[end : end + nbytes] == tensor.numpy().tobytes(), name
        end += nbytes
    assert len(data) == end


def test_wrong_sizes_and_repeated_names_are_refused(tmp_path):
    with SafetensorsWriter(tmp_path / "a.st") as writer:
        writer.begin("w", torch.float32, (2, 2))
        writer.write(torch.zeros(3))
        with pytest.raises(RuntimeError, match="got 12 bytes"):
            writer.end()
    with SafetensorsWriter(tmp_path / "a.st") as writer:
        writer.add("w", torch.zeros(2))
        with pytest.raises(ArtifactError, match="'w' is written twice"):
            writer.add("w", torch.zeros(2))
    with (
        SafetensorsWriter(tmp_path / "a.st") as writer,
        pytest.raises(ArtifactError, match="complex64, which safetensors cannot store"),
    ):
        writer.add("c", torch.zeros(2, dtype=torch.complex64))
    assert list(tmp_path.iterdir()) == []  # never finished: nothing written


def test_without_copy_file_range_the_data_is_copied_in_python(tmp_path, monkeypatch):
    def unsupported(*args):
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    kernel_copy = os.copy_file_range
    write_safetensors(tmp_path / "kernel.st", TENSORS, {})
    monkeypatch.setattr(os, "copy_file_range", unsupported)
    write_safetensors(tmp_path / "python.st", TENSORS, {})
    calls = []

    def partly(src, dst, count, offset):  # copies a few bytes, then nothing, as some file
        calls.append(count)  # systems do instead of refusing
        return kernel_copy(src, dst, min(count, 24), offset) if len(calls) == 1 else 0

    monkeypatch.setattr(os, "copy_file_range", partly)
    write_safetensors(tmp_path / "partly.st", TENSORS, {})
    monkeypatch.delattr(os, "copy_file_range")
    write_safetensors(tmp_path / "none.st", TENSORS, {})
    expected = (tmp_path / "kernel.st").read_bytes()
    assert len(calls) == 2
    for name in ("python.st", "partly.st", "none.st"):
        assert (tmp_path / name).read_bytes() == expected, name


def test_a_copy_short_of_the_data_is_an_error(tmp_path, monkeypatch):
    kernel_copy = os.copy_file_range

    def short(src, dst, count, offset):  # copies 8 bytes less than it says
        return kernel_copy(src, dst, count - 8, offset) + 8

    monkeypatch.setattr(os, "copy_file_range", short)
    with pytest.raises(ArtifactError, match="copied 3992 of 4000 data bytes"):
        write_safetensors(tmp_path / "a.st", {"w": torch.zeros(1000)}, {})
    assert list(tmp_path.iterdir()) == []


def test_a_copy_beyond_the_data_is_an_error(tmp_path, monkeypatch):
    kernel_copy = os.copy_file_range

    def long(src, dst, count, offset):  # eight bytes the header does not account for
        return kernel_copy(src, dst, count, offset) + os.write(dst, b"x" * 8)

    monkeypatch.setattr(os, "copy_file_range", long)
    with pytest.raises(ArtifactError, match="copied 4008 of 4000 data bytes"):
        write_safetensors(tmp_path / "a.st", {"w": torch.zeros(1000)}, {})
    assert list(tmp_path.iterdir()) == []


def test_other_copy_errors_are_reported(tmp_path, monkeypatch):
    def failing(*args):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "copy_file_range", failing)
    with pytest.raises(ArtifactError, match="cannot write: Input/output error"):
        write_safetensors(tmp_path / "a.st", TENSORS, {})
    assert list(tmp_path.iterdir()) == []


def test_the_data_file_leaves_no_name_behind(tmp_path):
    with SafetensorsWriter(tmp_path / "a.st") as writer:
        writer.add("w", torch.zeros(1000))
        assert list(tmp_path.iterdir()) == []  # unlinked from the start
        writer.finish({})
    assert [p.name for p in tmp_path.iterdir()] == ["a.st"]
