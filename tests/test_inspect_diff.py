"""``refq inspect --diff``: every tensor's bytes, the module configs, spec and source compared."""

from __future__ import annotations

import io
import json
import math
import shutil
import struct
import tracemalloc
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from refq_cli.cli.app import app
from refq_cli.io import header
from refq_cli.io.header import read_layout
from refq_cli.pipeline import inspect as inspect_module
from refq_cli.pipeline.convert import convert_checkpoint as convert
from tests.checkpoints import write
from tests.scripts import run_and_check_torch, run_refq

SPEC = "version: 1\ndefaults: {dtype: qint8}\nmodules:\n  aux: {nonlinearity: relu}\n"


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def strict(text: str):
    def refuse(constant):
        raise AssertionError(f"{constant} in strict JSON")

    return json.loads(text, parse_constant=refuse)


def artifact(folder: Path, name: str, spec: str = SPEC, seed: int = 0) -> Path:
    sources = folder / f"seed{seed}"
    sources.mkdir(exist_ok=True)
    source = sources / "model.pt"
    if not source.exists():
        source = write(sources, "pt", seed=seed)
    spec_path = folder / f"{name}.yaml"
    spec_path.write_text(spec)
    convert(source, spec_path, folder / name, force=True)
    return folder / name


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return artifact(tmp_path_factory.mktemp("base"), "a.refq.safetensors")


def patched(base: Path, out: Path, tensor: str, change) -> Path:
    """A copy of ``base`` with the bytes of ``tensor`` replaced by ``change(bytes)``."""
    shutil.copy(base, out)
    entry = read_layout(out).tensors[tensor]
    with open(out, "r+b") as f:
        f.seek(entry.start)
        data = f.read(entry.end - entry.start)
        new = change(data)
        assert len(new) == len(data) and new != data
        f.seek(entry.start)
        f.write(new)
    return out


def floats(data: bytes) -> list[float]:
    return list(struct.unpack(f"<{len(data) // 4}f", data))


def packed(values: list[float]) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


def diff(a: Path, b: Path, *options: str) -> tuple[int, list[dict], str]:
    """Exit code, JSON records and text of ``refq inspect --diff a b``."""
    as_json = invoke("inspect", "--diff", a, b, "--json", *options)
    text = invoke("inspect", "--diff", a, b, *options)
    assert as_json.exit_code == text.exit_code, (as_json.output, text.output)
    return as_json.exit_code, strict(as_json.stdout)["differences"], text.stdout


def test_every_code_of_a_weight_changed(base, tmp_path):
    name = "encoder.weight_ih_l0"
    b = patched(base, tmp_path / "b.st", name, lambda d: bytes(x ^ 1 for x in d))
    code, records, text = diff(base, b)
    entry = read_layout(base).tensors[name]
    count = math.prod(entry.shape)
    assert code == 1
    assert records == [
        {
            "section": "tensors",
            "tensor": name,
            "change": "values",
            "role": "codes",
            "dtype": entry.dtype,
            "differ": count,
            "of": count,
            "max_abs_diff": 1,
        }
    ]
    assert f"{name}: {count:,} of {count:,} codes differ (max |Δ| 1)" in text


def test_some_codes_of_a_weight_changed(base, tmp_path):
    name = "decoder.cell.weight_hh"
    entry = read_layout(base).tensors[name]

    def change(data: bytes) -> bytes:
        assert entry.dtype == "I8"
        codes = list(struct.unpack(f"<{len(data)}b", data))
        for i in range(0, 37 * 3, 3):
            codes[i] += -2 if codes[i] >= 0 else 2
        return struct.pack(f"<{len(codes)}b", *codes)

    b = patched(base, tmp_path / "b.st", name, change)
    code, records, text = diff(base, b)
    assert code == 1 and len(records) == 1
    assert (records[0]["differ"], records[0]["max_abs_diff"]) == (37, 2)
    assert f"{name}: 37 of {math.prod(entry.shape):,} codes differ (max |Δ| 2)" in text


def test_a_bias_changed(base, tmp_path):
    name = "encoder.bias_ih_l0"
    old = floats(base.read_bytes()[slice(*_range(base, name))])
    new = [v + 0.0003 if i % 3 == 0 else v for i, v in enumerate(old)]
    new = floats(packed(new))  # as float32 stores them
    b = patched(base, tmp_path / "b.st", name, lambda d: packed(new))
    code, records, text = diff(base, b)
    differ = sum(x != y for x, y in zip(old, new, strict=True))
    worst = max(abs(x - y) for x, y in zip(old, new, strict=True))
    assert code == 1 and differ == 11
    assert records == [
        {
            "section": "tensors",
            "tensor": name,
            "change": "values",
            "role": "values",
            "dtype": "F32",
            "differ": differ,
            "of": len(old),
            "max_abs_diff": worst,
        }
    ]
    assert f"{name}: 11 of 32 values differ, max |Δ| {worst:.3g}" in text
    assert "0.0003" in text and not any(len(w) > 8 for w in text.split() if w[0].isdigit())


@pytest.mark.parametrize(
    ("name", "role"),
    [
        ("frontend.weight", "values"),
        ("head.bias", "values"),
        ("gate.weight_ih_scale", "scales"),
        ("encoder.weight_hh_l1_zero_point", "zero_points"),
    ],
)
def test_other_tensors_changed(base, tmp_path, name, role):
    entry = read_layout(base).tensors[name]

    def change(data: bytes) -> bytes:
        if entry.dtype == "F32":
            values = floats(data)
            values[-1] = values[-1] * 2 + 1
            return packed(values)
        size = header.DTYPE_SIZES[entry.dtype]
        code = {1: "b", 4: "i", 8: "q"}[size]
        values = list(struct.unpack(f"<{len(data) // size}{code}", data))
        values[0] += 3
        return struct.pack(f"<{len(values)}{code}", *values)

    b = patched(base, tmp_path / "b.st", name, change)
    code, records, text = diff(base, b)
    assert code == 1
    assert [(r["tensor"], r["role"], r["differ"]) for r in records] == [(name, role, 1)]
    shown = {"zero_points": "zero points"}.get(role, role)
    assert f"{name}: 1 of {math.prod(entry.shape):,} {shown} differ" in text


def test_nan_and_signed_zero_are_compared_bit_for_bit(base, tmp_path):
    name = "head.bias"
    old = floats(base.read_bytes()[slice(*_range(base, name))])
    with_nan = patched(base, tmp_path / "nan.st", name, lambda d: packed([math.nan, *old[1:]]))
    same_nan = patched(base, tmp_path / "nan2.st", name, lambda d: packed([math.nan, *old[1:]]))
    assert diff(with_nan, same_nan)[0] == 0
    code, records, text = diff(base, with_nan)
    assert code == 1 and records[0]["max_abs_diff"] is None  # NaN: null in strict JSON
    assert f"{name}: 1 of 2 values differ, max |Δ| nan" in text
    zero = patched(base, tmp_path / "z.st", name, lambda d: packed([0.0, *old[1:]]))
    minus = patched(base, tmp_path / "mz.st", name, lambda d: packed([-0.0, *old[1:]]))
    code, records, _ = diff(zero, minus)
    assert code == 1 and (records[0]["differ"], records[0]["max_abs_diff"]) == (1, 0.0)


def test_another_checkpoint_of_the_same_shapes(base, tmp_path):
    b = artifact(tmp_path, "b.refq.safetensors", seed=1)
    code, records, text = diff(base, b)
    assert code == 1
    sha = [json.loads(read_layout(p).metadata["refq.source"])["sha256"] for p in (base, b)]
    assert {
        "section": "source",
        "field": "sha256",
        "change": "changed",
        "before": sha[0],
        "after": sha[1],
    } in records
    assert f"source sha256: {sha[0][:12]}… → {sha[1][:12]}…" in text
    roles = {r["role"] for r in records if r["section"] == "tensors"}
    assert roles == {"codes", "scales", "values"}  # symmetric: every zero point 0
    assert "encoder.weight_ih_l0: " in text and " codes differ (max |Δ| " in text
    assert "{" not in text and "[" not in text  # no raw dicts or lists


def test_a_changed_spec(base, tmp_path):
    b = artifact(tmp_path, "b.refq.safetensors", SPEC.replace("qint8", "quint8"))
    code, records, text = diff(base, b)
    assert code == 1
    assert {
        "section": "spec",
        "field": "defaults.dtype",
        "change": "changed",
        "before": "qint8",
        "after": "quint8",
    } in records
    assert "spec: defaults.dtype qint8 → quint8" in text
    assert "gate.weight_ih: dtype qint8 → quint8" in text
    assert "gate.weight_ih: quant_min -128 → 0" in text
    # the filters narrow it to the matching modules and tensors, without the spec
    code, narrowed, _ = diff(base, b, "--module", "gate", "--weight", "weight_ih")
    assert code == 1
    assert {r.get("module") or r["tensor"] for r in narrowed} >= {"gate", "gate.weight_ih"}
    assert {r.get("tensor") for r in narrowed} <= {
        None,
        "gate.weight_ih",
        "gate.weight_ih_scale",
        "gate.weight_ih_zero_point",
    }
    fields = {r["field"] for r in narrowed if "field" in r}
    assert fields == {
        "weights.weight_ih.dtype",
        "weights.weight_ih.quant_min",
        "weights.weight_ih.quant_max",
        "dtype",
    }


def test_module_sets_and_tensor_layouts_that_differ(base, tmp_path):
    spec = SPEC + "rules:\n  - {match: encoder, skip: true}\n  - {match: gate, qscheme: "
    b = artifact(tmp_path, "b.refq.safetensors", spec + "per_tensor_affine}\n")
    code, records, text = diff(base, b)
    assert code == 1
    assert {"section": "modules", "module": "encoder", "change": "removed", "type": "LSTM"} in (
        records
    )
    assert "module encoder: only in " in text and f"{base} (LSTM)" in text
    assert "encoder.weight_ih_l0_scale: only in " in text
    assert "encoder.weight_ih_l0: tensor dtype I8 → F32" in text
    assert "gate.weight_ih_scale: tensor shape 15 → scalar" in text
    assert "gate.weight_ih: qscheme per_channel_affine → per_tensor_affine" in text
    # a float tensor in one artifact only
    tensors = {**load_file(str(base)), "extra.table": torch.ones(2, 3)}
    c = tmp_path / "c.st"
    save_file(tensors, str(c), read_layout(base).metadata)
    code, records, text = diff(base, c)
    assert code == 1
    assert records == [
        {
            "section": "tensors",
            "tensor": "extra.table",
            "change": "added",
            "dtype": "F32",
            "shape": [2, 3],
        }
    ]
    assert f"extra.table: only in {c} (F32 2x3)" in text


def test_identical_artifacts(base, tmp_path):
    again = artifact(tmp_path, "again.refq.safetensors")
    for other in (base, again):
        code, records, text = diff(base, other)
        assert (code, records) == (0, [])
        assert "no differences" in text
    output, imported_torch = run_and_check_torch(["inspect", "--diff", base, again])
    assert "no differences" in output and not imported_torch


def test_the_installed_script(base, tmp_path):
    b = patched(base, tmp_path / "b.st", "gate.bias_hh", lambda d: d[:-4] + bytes(4))
    result = run_refq("inspect", "--diff", base, b)
    assert result.returncode == 1, result.stderr
    assert "gate.bias_hh: 1 of 15 values differ, max |Δ| " in result.stdout
    assert result.stderr.startswith("refq: error: ") and len(result.stderr.splitlines()) == 1
    result = run_refq("inspect", "--diff", base, b, "--json")
    assert result.returncode == 1
    assert [r["tensor"] for r in strict(result.stdout)["differences"]] == ["gate.bias_hh"]
    assert run_refq("inspect", "--diff", base, base).returncode == 0


def test_hostile_artifacts_are_one_line_errors(base, tmp_path):
    truncated = tmp_path / "cut.st"
    truncated.write_bytes(base.read_bytes()[:-3])
    wrong = tmp_path / "wrong.st"
    metadata = {**read_layout(base).metadata, "refq.spec": "[1, 2"}
    save_file(load_file(str(base)), str(wrong), metadata)
    for path, pattern in ((truncated, "truncated"), (wrong, "refq.spec is not JSON")):
        for args in (("--diff", base, path), ("--diff", path, base, "--json")):
            result = invoke("inspect", *args)
            assert result.exit_code == 2, result.output
            assert result.output.startswith("refq: error: ") and pattern in result.output
            assert len(result.output.splitlines()) == 1


def test_a_large_tensor_is_compared_in_bounded_memory(tmp_path, monkeypatch):
    """A 32 MiB float tensor, three values changed: read in blocks, never whole."""
    state = {k: v for k, v in torch.nn.GRUCell(4, 3).state_dict().items()}
    state = {f"gate.{k}": v for k, v in state.items()}
    state["head.weight"] = torch.zeros(2048, 4096)
    source = tmp_path / "big.pt"
    torch.save(state, source)
    spec = tmp_path / "q.yaml"
    spec.write_text("version: 1\n")
    a = tmp_path / "a.st"
    convert(source, spec, a)
    name = "head.weight"
    positions = (5, 3_000_001, 2048 * 4096 - 1)

    def change(data: bytes) -> bytes:
        data = bytearray(data)
        for n, i in enumerate(positions):
            data[4 * i : 4 * i + 4] = struct.pack("<f", 0.5 * (n + 1))
        return bytes(data)

    b = patched(a, tmp_path / "b.st", name, change)
    sizes = []

    class Recording(io.FileIO):
        def read(self, size=-1):
            data = super().read(size)
            sizes.append(len(data))
            return data

    def recording_open(path, mode="r", opener=None):
        return Recording(path, mode, opener=opener)

    monkeypatch.setattr(header, "open", recording_open, raising=False)
    tracemalloc.start()
    try:
        records = inspect_module.diff_artifacts(a, b)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert records == [
        {
            "section": "tensors",
            "tensor": name,
            "change": "values",
            "role": "values",
            "dtype": "F32",
            "differ": 3,
            "of": 2048 * 4096,
            "max_abs_diff": 1.5,
        }
    ]
    block = inspect_module.DIFF_BLOCK_BYTES
    assert max(sizes) <= block < 2048 * 4096 * 4
    assert peak < 3 * block + (4 << 20), peak


def _range(path: Path, name: str) -> tuple[int, int]:
    entry = read_layout(path).tensors[name]
    return entry.start, entry.end
