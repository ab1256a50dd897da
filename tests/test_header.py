"""The torch-free safetensors reader against the safetensors library: same reads, same refusals."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from refq_cli.errors import ArtifactError
from refq_cli.io.header import read_header, read_layout, read_values

TENSORS = {
    "f64": torch.randn(3, dtype=torch.float64),
    "f32": torch.randn(2, 3),
    "f16": torch.randn(4).half(),
    "bf16": torch.randn(2).bfloat16(),
    "i64": torch.tensor([-(2**40), 5]),
    "i32": torch.tensor([[-7], [2**30]], dtype=torch.int32),
    "i16": torch.tensor([-300, 300], dtype=torch.int16),
    "i8": torch.tensor([-128, 127], dtype=torch.int8),
    "u8": torch.tensor([0, 255], dtype=torch.uint8),
    "empty": torch.zeros(0, 4),
    "scalar": torch.tensor(1.5),
    "flag": torch.tensor([True, False]),
}
NUMBERS = {"f64", "f32", "f16", "i64", "i32", "i16", "i8", "u8", "empty", "scalar"}


def test_reads_what_the_library_reads(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file(TENSORS, str(path), metadata={"format": "refq", "k": "v"})
    layout = read_layout(path)
    with safe_open(str(path), "pt") as f:
        assert layout.metadata == f.metadata()
        assert sorted(layout.tensors) == sorted(f.keys())
        for name, entry in layout.tensors.items():
            tensor = f.get_tensor(name)
            assert entry.shape == list(tensor.shape)
            assert entry.dtype == f.get_slice(name).get_dtype()
            if name in NUMBERS:
                assert read_values(path, name, entry) == tensor.reshape(-1).tolist(), name
    with pytest.raises(ArtifactError, match="'bf16' is BF16, not a number refq reads"):
        read_values(path, "bf16", layout.tensors["bf16"])


def test_every_dtype_refq_writes_has_its_size():
    from refq_cli.io.header import DTYPE_SIZES
    from refq_cli.io.safetensors_writer import _SAFETENSORS_DTYPES

    for dtype, name in _SAFETENSORS_DTYPES.items():
        assert DTYPE_SIZES[name] == torch.empty(0, dtype=dtype).element_size(), name


def raw_file(path, header, data=b"", size=None):
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if size is None else size) + text + data)
    return path


def entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


BAD = {
    "too short": (b"{}", b"", 2**40, "a header of 1099511627776 bytes"),
    "not JSON": (b"{nope", b"", None, "not JSON"),
    "a list": (b"[1, 2]", b"", None, "not a JSON object"),
    "metadata not strings": ({"__metadata__": {"a": 1}}, b"", None, "map names to strings"),
    "unknown dtype": ({"w": entry(dtype="F7")}, b"\0" * 8, None, "unknown dtype 'F7'"),
    "negative dimension": ({"w": entry(shape=(-2,))}, b"\0" * 8, None, "malformed shape"),
    "boolean dimension": ({"w": entry(shape=(True, 2))}, b"\0" * 8, None, "malformed shape"),
    "three offsets": ({"w": entry(offsets=(0, 4, 8))}, b"\0" * 8, None, "malformed data_offsets"),
    "reversed offsets": ({"w": entry(offsets=(8, 0))}, b"\0" * 8, None, "malformed data_offsets"),
    "wrong size": ({"w": entry(shape=(3,))}, b"\0" * 8, None, "holds 8 bytes, not those of"),
    "gap": ({"w": entry(offsets=(4, 12))}, b"\0" * 12, None, "overlaps another or leaves a gap"),
    "overlap": (
        {"a": entry(), "b": entry(offsets=(4, 12))},
        b"\0" * 12,
        None,
        "overlaps another or leaves a gap",
    ),
    "truncated": ({"w": entry()}, b"\0" * 5, None, "its tensors end at byte"),
    "trailing bytes": ({"w": entry()}, b"\0" * 9, None, "its tensors end at byte"),
    "deep nesting": (b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}", b"", None, "not JSON"),
    "dtype not a string": ({"w": entry(dtype=["F32"])}, b"\0" * 8, None, "unknown dtype"),
    "4301-digit number": (
        b'{"w":{"dtype":"F32","shape":[' + b"9" * 4301 + b'],"data_offsets":[0,8]}}',
        b"\0" * 8,
        None,
        "not JSON",
    ),
    "shape beyond 2**64 bytes": (
        {"w": entry(shape=[2**32 - 1] * 64_000)},
        b"\0" * 8,
        None,
        r"more than 2\*\*64 bytes: \[4294967295, 4294967295, ",
    ),
    "lone surrogate": (b'{"__metadata__":{"k":"\\ud800"}}', b"", None, "not JSON"),
    "UTF-16": ("{}".encode("utf-16-le"), b"", None, "not JSON"),
    "metadata a list": ({"__metadata__": []}, b"", None, "map names to strings"),
    "NaN": (
        b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":NaN}}',
        b"\0" * 8,
        None,
        "not JSON",
    ),
    "two __metadata__": (
        b'{"__metadata__":{"format":"refq"},"__metadata__":{"format":"refq"}}',
        b"",
        None,
        "its header has two __metadata__",
    ),
    "__metadata__ again after the tensors": (
        b'{"__metadata__":{},"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
        b'"__metadata__":{}}',
        b"\0" * 8,
        None,
        "its header has two __metadata__",
    ),
    "dtype twice": (
        b'{"w":{"dtype":"F32","dtype":"F32","shape":[2],"data_offsets":[0,8]}}',
        b"\0" * 8,
        None,
        "tensor 'w' gives dtype twice",
    ),
    "data_offsets twice": (
        b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"data_offsets":[0,8]}}',
        b"\0" * 8,
        None,
        "tensor 'w' gives data_offsets twice",
    ),
}

# Repeated names the library reads, the last one winning: refq reads them the same way.
REPEATED = {
    "tensor name": b'{"w":{"dtype":"I32","shape":[1],"data_offsets":[0,4]},'
    b'"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}',
    "metadata key": b'{"__metadata__":{"k":"1","k":"2"},'
    b'"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}',
    "unknown field of a tensor": b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8],'
    b'"x":1,"x":2}}',
}


@pytest.mark.parametrize("case", REPEATED, ids=list(REPEATED))
def test_repeated_names_the_library_reads_are_read_alike(tmp_path, case):
    path = raw_file(tmp_path / "repeated.safetensors", REPEATED[case], struct.pack("<2f", 1, 2))
    layout = read_layout(path)
    with safe_open(str(path), "pt") as f:
        assert layout.metadata == (f.metadata() or {})
        assert list(layout.tensors) == list(f.keys()) == ["w"]
        assert layout.tensors["w"].dtype == f.get_slice("w").get_dtype() == "F32"
        assert read_values(path, "w", layout.tensors["w"]) == f.get_tensor("w").tolist()


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_refuses_what_the_library_refuses(tmp_path, case):
    header, data, size, message = BAD[case]
    path = raw_file(tmp_path / "bad.safetensors", header, data, size)
    with pytest.raises(ArtifactError, match=message) as refusal:
        read_layout(path)
    assert str(path) in str(refusal.value)
    with pytest.raises(Exception), safe_open(str(path), "pt") as f:  # noqa: B017  (its types vary)
        for name in f.keys():  # noqa: SIM118  (the handle is no mapping)
            f.get_tensor(name)


def test_files_shorter_than_the_size_field(tmp_path):
    for content in (b"", b"\x01\x02"):
        path = tmp_path / "short.safetensors"
        path.write_bytes(content)
        with pytest.raises(ArtifactError, match="shorter than 8 bytes"):
            read_layout(path)


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path):
    import os
    import threading

    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    errors = []
    reader = threading.Thread(target=lambda: errors.append(_refusal(fifo)), daemon=True)
    reader.start()
    reader.join(timeout=10)
    assert not reader.is_alive(), "read_layout blocked on a FIFO with no writer"
    assert "not a regular file" in errors[0]


def _refusal(path):
    try:
        read_layout(path)
    except ArtifactError as exc:
        return str(exc)
    return "accepted"


@pytest.mark.parametrize("version", ["\u00b2", "9" * 5000, "", "1.0"])
def test_format_versions_that_are_not_plain_numbers(tmp_path, version):
    path = tmp_path / "a.safetensors"
    save_file(
        {"w": torch.zeros(1)},
        str(path),
        metadata={"format": "refq", "refq.format_version": version},
    )
    with pytest.raises(ArtifactError, match="is not a number"):
        read_header(path)


def _metadata(source):
    from refq_cli.io.header import Layout

    metadata = {"format": "refq", "refq.format_version": "1", "refq.modules": "{}"}
    metadata |= {"refq.spec": "{}", "refq.producer": '{"refq": "0", "torch": "2"}'}
    return Layout({**metadata, "refq.source": json.dumps(source)}, {})


SOURCE = {"name": "model.safetensors.index.json", "sha256": "ab" * 32, "format": "safetensors"}
SHARDS = [{"name": "model-00001-of-00002.safetensors", "sha256": "cd" * 32}]


def test_the_shards_of_a_sharded_source_are_read(tmp_path):
    from refq_cli.io.header import check_metadata

    assert "shards" not in check_metadata(tmp_path, _metadata(SOURCE))["refq.source"]
    two = [*SHARDS, {"name": "model-00002-of-00002.safetensors", "sha256": "ef" * 32}]
    checked = check_metadata(tmp_path, _metadata({**SOURCE, "shards": two}))
    assert checked["refq.source"]["shards"] == two


@pytest.mark.parametrize(
    ("shards", "pattern"),
    [
        (
            {"a": "b"},
            r"refq\.source\.shards must be a list of one or more \{name, sha256\} records",
        ),
        ([], r"refq\.source\.shards must be a list of one or more"),
        (None, r"refq\.source\.shards must be a list"),
        (["model.bin"], r"refq\.source\.shards\[0\] must be a JSON object, got 'model.bin'"),
        ([*SHARDS, {"sha256": "00"}], r"refq\.source\.shards\[1\]\.name is missing"),
        ([{"name": "a.bin"}], r"refq\.source\.shards\[0\]\.sha256 is missing"),
        ([{"name": 3, "sha256": "00"}], r"refq\.source\.shards\[0\]\.name must be text, got 3"),
        (
            [{"name": "a", "sha256": [1]}],
            r"refq\.source\.shards\[0\]\.sha256 must be text, got \[1\]",
        ),
    ],
)
def test_malformed_shards_of_a_source_are_refused(tmp_path, shards, pattern):
    from refq_cli.io.header import check_metadata

    with pytest.raises(ArtifactError, match=rf"^{tmp_path}: corrupt artifact: metadata {pattern}"):
        check_metadata(tmp_path, _metadata({**SOURCE, "shards": shards}))
