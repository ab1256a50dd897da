"""Hugging Face sharded checkpoints: an index and its shards read as one checkpoint."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from refq_cli.errors import CheckpointError
from refq_cli.io.checkpoint import load_checkpoint
from refq_cli.io.sharded import (
    MAX_CONTAINERS,
    MAX_INDEX_BYTES,
    MAX_NAMES,
    MAX_SHARDS,
    is_index,
    read_checked,
    read_index,
)
from refq_cli.pipeline.jobs import checkpoint_files
from refq_cli.pipeline.uptodate import source_unchanged
from tests.checkpoints import SHARD_NAMES, tagger_state, write_sharded

KINDS = ["safetensors", "bin"]
ROOT = Path(__file__).resolve().parents[1]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def index_of(path: Path) -> dict:
    return json.loads(path.read_text())


def rewrite(path: Path, index: dict) -> Path:
    path.write_text(json.dumps(index))
    return path


def refused(path: Path, pattern: str, **kwargs) -> CheckpointError:
    with pytest.raises(CheckpointError, match=pattern) as caught:
        load_checkpoint(path, **kwargs)
    assert caught.value.exit_code == 2 and "\n" not in str(caught.value)
    return caught.value


# --- reading ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_a_module_split_across_shards_is_the_unsharded_files(tmp_path, kind):
    state = tagger_state()
    whole = tmp_path / "whole"
    whole.mkdir()
    if kind == "safetensors":
        save_file(state, whole / "model.safetensors")
        single = load_checkpoint(whole / "model.safetensors")
    else:
        torch.save(state, whole / "pytorch_model.bin")
        single = load_checkpoint(whole / "pytorch_model.bin")
    index = write_sharded(tmp_path / "sharded", kind, state)
    assert index.name == SHARD_NAMES[kind][0]
    sharded = load_checkpoint(index)
    assert (
        sharded.format
        == single.format
        == ("safetensors" if kind == "safetensors" else "state_dict")
    )
    assert {p: (m.float_type, m.config) for p, m in sharded.modules.items()} == {
        p: (m.float_type, m.config) for p, m in single.modules.items()
    }
    assert sharded.modules["lstm"].config["num_layers"] == 2  # layer 0 and 1 in two shards
    assert sorted(sharded.tensors) == sorted(single.tensors) == sorted(state)
    for key, tensor in state.items():
        assert torch.equal(sharded.tensors[key], tensor), key
    assert sorted(sharded.other_tensor_names) == ["head.bias", "head.weight"]
    built = sharded.modules["lstm"].build(sharded.tensors, {})
    assert torch.equal(built.weight_hh_l1, state["lstm.weight_hh_l1"])


@pytest.mark.parametrize("kind", KINDS)
def test_the_source_records_the_index_and_every_shard(tmp_path, kind):
    index = write_sharded(tmp_path, kind)
    checkpoint = load_checkpoint(index)
    shards = sorted(p for p in tmp_path.iterdir() if p != index)
    assert checkpoint.sha256 == sha256(index)
    assert checkpoint.source == {
        "name": index.name,
        "sha256": sha256(index),
        "format": checkpoint.format,
        "shards": [{"name": p.name, "sha256": sha256(p)} for p in shards],  # sorted by name
    }
    assert [s.name for s in checkpoint.shards] == [p.name for p in shards]
    (tmp_path / "alone").mkdir()  # a file no index lists: a checkpoint of its own
    single = load_checkpoint(shutil.copy(shards[0], tmp_path / "alone"))
    assert "shards" not in single.source and single.shards == ()


def test_tensors_keep_the_shards_order_then_each_files(tmp_path):
    state = tagger_state()
    keys = list(state)
    index = write_sharded(tmp_path, "bin", state, parts=[keys[:3], keys[3:]])
    assert list(load_checkpoint(index).tensors) == keys  # the model's order, not the map's


def test_an_index_names_its_shards_and_checkpoint_files_lists_them(tmp_path):
    index = write_sharded(tmp_path / "d", "safetensors")
    shards = sorted(p for p in index.parent.iterdir() if p != index)
    assert read_checked(index).shards == [p.name for p in shards]
    assert checkpoint_files(index) == [index, *shards]
    assert checkpoint_files(shards[0]) == [shards[0]]
    assert is_index(index) and not is_index(shards[0]) and not is_index(tmp_path / "index.json")
    assert read_index(index).shards == [p.name for p in shards]


def test_the_index_is_read_without_torch(tmp_path):
    index = write_sharded(tmp_path, "safetensors")
    code = (
        "import sys; from pathlib import Path; from refq_cli.io.sharded import read_checked; "
        f"print(len(read_checked(Path({str(index)!r})).shards)); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.split() == ["2", "False"], out.stderr  # two shards


def test_a_linked_shard_elsewhere_is_read(tmp_path):
    """The Hugging Face cache: snapshots/REV/NAME links to blobs/SHA256."""
    index = write_sharded(tmp_path / "snapshot", "safetensors")
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for shard in [p for p in index.parent.iterdir() if p != index]:
        blob = blobs / sha256(shard)
        shard.rename(blob)
        shard.symlink_to(blob)
    assert load_checkpoint(index).modules["lstm"].config["num_layers"] == 2


# --- refusals ---------------------------------------------------------------------------------


def first_shard(index: Path) -> str:
    return sorted(set(index_of(index)["weight_map"].values()))[0]


@pytest.mark.parametrize(
    ("shard", "pattern"),
    [
        ("/etc/passwd", r"weight_map\['head.bias'\]: shard '/etc/passwd' is not a file name"),
        ("../x.safetensors", r"shard '../x.safetensors' is not a file name; shards are files in"),
        ("sub/x.safetensors", r"shard 'sub/x.safetensors' is not a file name"),
        ("sub\\x.safetensors", r"is not a file name"),
        ("..", r"shard '..' is not a file name"),
        (".", r"shard '.' is not a file name"),
        ("", r"shard '' is not a file name"),
        ("a\0b", r"is not a file name"),
        ("a\nb.bin", r"shard 'a\\nb.bin' is not a file name"),
        ("\x1b[2Jx.bin", r"is not a file name"),
        ("model.safetensors.index.json", r"shard 'model.safetensors.index.json' is this index"),
        ("pytorch_model.bin.index.json", r"is an index, not a shard"),
        ("\ud800.bin", r"the shard name is not valid Unicode"),
        (3, r"weight_map\['head.bias'\] must be a shard's file name, got a number"),
        (None, r"must be a shard's file name, got null"),
        (["a"], r"must be a shard's file name, got a list"),
        (
            "missing.safetensors",
            r"weight_map\['head.bias'\]: shard 'missing.safetensors': no such shard file",
        ),
    ],
)
def test_shards_that_are_not_files_beside_the_index_are_refused(tmp_path, shard, pattern):
    index = write_sharded(tmp_path, "safetensors")
    content = index_of(index)
    content["weight_map"]["head.bias"] = shard  # the first key of the map
    error = refused(rewrite(index, content), pattern)
    assert str(error).startswith(f"{index}: ")
    with pytest.raises(CheckpointError, match=pattern):
        read_checked(index)


@pytest.mark.parametrize(
    ("data", "pattern"),
    [
        (b"", r"not a checkpoint index: not UTF-8 JSON"),
        (b"\xff\xfe{}", r"not UTF-8 JSON"),
        (b'{"weight_map": {"a": "b"}', r"not UTF-8 JSON"),
        (b"[1, 2]", r'expected a JSON object \{"metadata": ..., "weight_map": ...\}'),
        (b'"text"', r"expected a JSON object"),
        (b'{"metadata": {}}', r"it has no weight_map"),
        (b'{"weight_map": ["a"]}', r"weight_map must be a JSON object .*, got a list"),
        (b'{"weight_map": {}}', r"weight_map is empty: the index names no shard"),
        (b'{"weight_map": {"a": "s.bin", "a": "t.bin"}}', r"weight_map\['a'\] is given twice"),
        (b'{"weight_map": {}, "weight_map": {}}', r"key 'weight_map' is given twice"),
        (b'{"metadata": [], "weight_map": {"a": "s"}}', r"metadata must be a JSON object"),
        (b'{"metadata": {"x": NaN}, "weight_map": {}}', r"not UTF-8 JSON \(NaN is not JSON\)"),
        (b'{"weight_map": {"\\ud800": "s.bin"}}', r"tensor name is not valid Unicode"),
        (b'{"weight_map": {"a": "s"}, "x": ' + b"9" * 5000 + b"}", r"not UTF-8 JSON"),
    ],
)
def test_indexes_that_are_not_json_objects_of_a_weight_map_are_refused(tmp_path, data, pattern):
    index = tmp_path / "model.safetensors.index.json"
    index.write_bytes(data)
    error = refused(index, pattern)
    assert str(error).startswith(f"{index}: ")


def test_an_index_of_absurd_size_is_refused_without_reading_it_all(tmp_path):
    index = tmp_path / "model.safetensors.index.json"
    with index.open("wb") as f:  # sparse: no disk used
        f.truncate(MAX_INDEX_BYTES * 16)
    started = time.perf_counter()
    refused(index, r"an index of over 64 MiB is no checkpoint index")
    with pytest.raises(CheckpointError, match="over 64 MiB"):
        read_checked(index)
    assert time.perf_counter() - started < 10


@pytest.mark.parametrize("where", ["top", "metadata", "weight_map"])
def test_deeply_nested_json_is_refused(tmp_path, where):
    deep = "[" * 5000 + "]" * 5000  # fewer than MAX_CONTAINERS: json itself gives up
    text = {
        "top": deep,
        "metadata": '{"metadata": ' + deep + ', "weight_map": {"a": "b"}}',
        "weight_map": '{"weight_map": {"a": ' + deep + "}}",
    }[where]
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(text)
    refused(index, r"its JSON nests too deeply")


@pytest.mark.parametrize(
    ("body", "pattern"),
    [
        (b"{}," * 20_000, rf"holds 20004 JSON objects or lists; .* at most {MAX_CONTAINERS}$"),
        (b"[]," * 20_000, r"holds 20004 JSON objects or lists"),
        (b'"a", "b",' * (MAX_NAMES + 1000), rf"holds over {MAX_NAMES} names; refq reads indexes"),
    ],
)
def test_indexes_that_would_cost_far_more_than_their_size_are_refused_unparsed(
    tmp_path, body, pattern
):
    """64 MiB of ``{},`` parse into 22 million dicts: 2.4 GB and 20 s."""
    index = tmp_path / "model.safetensors.index.json"
    index.write_bytes(b'{"metadata": {"x": [' + body + b'0]}, "weight_map": {"a": "s"}}')
    started = time.perf_counter()
    refused(index, pattern)
    assert time.perf_counter() - started < 2


def test_a_hundred_thousand_entries_are_checked_quickly(tmp_path):
    index = write_sharded(tmp_path, "safetensors")
    content = index_of(index)
    shard = first_shard(index)
    content["weight_map"].update({f"extra.{n}": shard for n in range(100_000)})
    started = time.perf_counter()
    refused(rewrite(index, content), r"weight_map\['extra.0'\] places tensor 'extra.0' in shard")
    content["weight_map"] = {f"t.{n}": f"s{n}.safetensors" for n in range(100_000)}
    refused(rewrite(index, content), rf"weight_map names over {MAX_SHARDS} shards")
    assert time.perf_counter() - started < 30


def test_many_missing_shards_stop_at_the_first(tmp_path):
    index = tmp_path / "model.safetensors.index.json"
    rewrite(index, {"weight_map": {f"t.{n}": f"s{n}.safetensors" for n in range(MAX_SHARDS)}})
    refused(index, r"weight_map\['t.0'\]: shard 's0.safetensors': no such shard file")


def test_a_shard_missing_a_tensor_the_map_places_in_it(tmp_path):
    index = write_sharded(tmp_path, "safetensors")
    content = index_of(index)
    content["weight_map"]["lstm.weight_xx"] = first_shard(index)
    refused(
        rewrite(index, content),
        rf"^{index}: weight_map\['lstm.weight_xx'\] places tensor 'lstm.weight_xx' in shard "
        rf"'{first_shard(index)}', which does not hold it$",
    )


def test_a_tensor_in_another_shard_than_the_map_says(tmp_path):
    index = write_sharded(tmp_path, "safetensors")
    content = index_of(index)
    first, second = sorted(set(content["weight_map"].values()))
    content["weight_map"]["lstm.weight_ih_l0"] = second  # it lies in the first
    refused(
        rewrite(index, content),
        rf"shard '{first}' holds tensor 'lstm.weight_ih_l0', which the weight_map places in "
        rf"shard '{second}'; the index and its shards disagree",
    )


def test_a_tensor_in_two_shards(tmp_path):
    state = tagger_state()
    keys = list(state)
    index = write_sharded(tmp_path, "safetensors", state, parts=[keys[:5], keys[4:]])
    refused(
        index,
        r"shard 'model-00001-of-00002.safetensors' holds tensor 'lstm.weight_ih_l1', which "
        r"the weight_map places in shard 'model-00002-of-00002.safetensors'",
    )
    content = index_of(index)  # the map names the first: the second holds it too
    content["weight_map"][keys[4]] = sorted(set(content["weight_map"].values()))[0]
    refused(rewrite(index, content), r"; a tensor lies in one shard; the index and its shards")


def test_a_tensor_the_map_does_not_list(tmp_path):
    index = write_sharded(tmp_path, "bin")
    content = index_of(index)
    del content["weight_map"]["head.weight"]
    refused(
        rewrite(index, content),
        r"shard 'pytorch_model-00002-of-00002.bin' holds tensor 'head.weight', which the "
        r"weight_map does not list; the index and its shards disagree",
    )


def test_shards_of_mixed_formats_are_refused(tmp_path):
    state = tagger_state()
    index = write_sharded(tmp_path, "safetensors", state)
    content = index_of(index)
    second = sorted(set(content["weight_map"].values()))[1]
    torch.save(
        {k: state[k] for k, v in content["weight_map"].items() if v == second}, tmp_path / "b.bin"
    )
    content["weight_map"] = {
        k: "b.bin" if v == second else v for k, v in content["weight_map"].items()
    }
    refused(
        rewrite(index, content),
        r"shard 'model-00001-of-00002.safetensors' is safetensors, but shard 'b.bin' is "
        r"state_dict; the shards of one checkpoint share a format",
    )


def test_a_shard_linked_to_the_index_or_to_another_shard(tmp_path):
    index = write_sharded(tmp_path, "safetensors")
    content = index_of(index)
    (tmp_path / "self.safetensors").symlink_to(index.name)
    content["weight_map"]["head.bias"] = "self.safetensors"
    refused(rewrite(index, content), r"shard 'self.safetensors' is the index itself \(a link")
    with pytest.raises(CheckpointError, match="is the index itself"):
        read_checked(index)
    (tmp_path / "again.safetensors").symlink_to("model-00001-of-00002.safetensors")
    content = index_of(write_sharded(tmp_path, "safetensors"))
    content["weight_map"]["head.bias"] = "again.safetensors"  # read first: sorted by name
    refused(
        rewrite(index, content),
        r"shard 'model-00001-of-00002.safetensors' is the same file as shard "
        r"'again.safetensors' \(a link\); each shard is a file of its own",
    )


def test_a_fifo_a_folder_or_a_device_as_a_shard_is_refused_without_waiting(tmp_path):
    index = write_sharded(tmp_path, "safetensors")
    content = index_of(index)
    os.mkfifo(tmp_path / "fifo.safetensors")
    (tmp_path / "folder.safetensors").mkdir()
    (tmp_path / "zero.safetensors").symlink_to("/dev/zero")
    for name, why in [
        ("fifo.safetensors", "is not a regular file"),
        ("folder.safetensors", "is a directory, not a shard file"),
        ("zero.safetensors", "is not a regular file"),
    ]:
        content["weight_map"]["head.bias"] = name
        started = time.perf_counter()
        refused(rewrite(index, content), rf"weight_map\['head.bias'\]: shard '{name}': {why}")
        with pytest.raises(CheckpointError, match=why):
            read_checked(index)
        assert time.perf_counter() - started < 10


def test_a_fifo_or_a_folder_as_the_index_is_refused_without_waiting(tmp_path):
    os.mkfifo(tmp_path / "model.safetensors.index.json")
    refused(tmp_path / "model.safetensors.index.json", r"index.json: is not a regular file")
    (tmp_path / "b.index.json").mkdir()
    refused(tmp_path / "b.index.json", r"is a directory, not a checkpoint file")
    refused(tmp_path / "c.index.json", r"c.index.json: no such checkpoint file")


def test_a_bad_shard_is_refused_as_a_single_file_is(tmp_path):
    index = write_sharded(tmp_path, "bin")
    shard = tmp_path / first_shard(index)
    shard.write_bytes(shard.read_bytes()[:100])
    refused(index, rf"^{shard}: cannot read the checkpoint")
    shard.write_bytes(b"")
    refused(index, rf"^{shard}: the file is empty$")

    class Boom:  # a pickle that would run code
        def __reduce__(self):
            return (print, ("ran",))

    torch.save({"lstm.weight_ih_l0": Boom()}, shard)
    refused(index, rf"^{shard}: refused to unpickle Python objects")


def test_a_json_file_not_named_as_an_index_says_how_to_name_it(tmp_path):
    index = write_sharded(tmp_path, "safetensors")
    other = tmp_path / "weights.json"
    other.write_bytes(index.read_bytes())
    refused(other, r"not a checkpoint refq can read .*; a sharded checkpoint's index is read by")


# --- changes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_check_unchanged_notices_a_rewritten_shard_or_index(tmp_path, kind):
    index = write_sharded(tmp_path, kind)
    checkpoint = load_checkpoint(index)
    checkpoint.check_unchanged()
    shard = checkpoint.shards[1].path
    data = shard.read_bytes()
    time.sleep(0.01)
    shard.write_bytes(data)  # the same bytes, written again
    with pytest.raises(CheckpointError, match=rf"^{shard}: changed while refq read it"):
        checkpoint.check_unchanged()
    checkpoint = load_checkpoint(index)
    index.write_text(index.read_text() + " ")
    with pytest.raises(CheckpointError, match=rf"^{index}: changed while refq read it"):
        checkpoint.check_unchanged()


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc")
def test_release_hands_back_every_shards_pages(tmp_path):
    state = {"a": torch.arange(3 << 20, dtype=torch.float32), "b": torch.ones(3 << 20)}
    index = write_sharded(tmp_path, "bin", state, parts=[["a"], ["b"]])  # 12 MiB each
    checkpoint = load_checkpoint(index)
    sums = {k: float(t.sum(dtype=torch.float64)) for k, t in checkpoint.tensors.items()}
    checkpoint.release(checkpoint.tensors.values())
    assert checkpoint._mapped and len(checkpoint._mapped) >= 2  # both shards' mappings
    assert {k: float(t.sum(dtype=torch.float64)) for k, t in checkpoint.tensors.items()} == sums


@pytest.mark.parametrize("kind", KINDS)
def test_source_unchanged_needs_the_index_and_every_shard(tmp_path, kind):
    index = write_sharded(tmp_path, kind)
    recorded = load_checkpoint(index).source
    assert source_unchanged(recorded, index)
    shard = tmp_path / first_shard(index)
    state = tagger_state(seed=1)
    changed = {k: state[k] for k in load_checkpoint(index).tensors if "_l0" in k}
    save_file(changed, shard) if kind == "safetensors" else torch.save(changed, shard)
    assert not source_unchanged(recorded, index)  # a shard changed, the index did not
    assert source_unchanged(load_checkpoint(index).source, index)
    assert not source_unchanged({**recorded, "shards": recorded["shards"][:1]}, index)
    assert not source_unchanged({k: v for k, v in recorded.items() if k != "shards"}, index)
    shard.unlink()
    assert not source_unchanged(recorded, index)  # unreadable: converting again says why
    single = tmp_path / "single.bin"
    torch.save(tagger_state(), single)
    assert source_unchanged(load_checkpoint(single).source, single)
    assert not source_unchanged({**load_checkpoint(single).source, "shards": []}, single)


# --- conversion, --skip-unchanged and verify --------------------------------------------------


@pytest.fixture
def converted(tmp_path):
    """(index, spec, artifact) of a sharded checkpoint converted, with its reports."""
    from refq_cli.pipeline.convert import convert_checkpoint

    index = write_sharded(tmp_path / "ck", "safetensors")
    spec = tmp_path / "q.yaml"
    spec.write_text("version: 1\n")
    artifact = tmp_path / "out" / "m.refq.safetensors"
    artifact.parent.mkdir()
    convert_checkpoint(index, spec, artifact)
    for report in ("m.refq.report.json", "m.refq.report.md"):  # what is_unchanged looks for
        (artifact.parent / report).write_text("{}")
    return index, spec, artifact


def rewrite_a_shard(index: Path) -> None:
    from safetensors.torch import load_file

    shard = index.parent / "model-00002-of-00002.safetensors"
    tensors = load_file(shard)
    tensors["head.bias"] += 1
    save_file(tensors, shard)


def test_the_artifact_records_every_shard(converted):
    from refq_cli.io.header import read_artifact

    index, _, artifact = converted
    source = read_artifact(artifact)[1]["refq.source"]
    assert source == load_checkpoint(index).source and len(source["shards"]) == 2


def test_skip_unchanged_needs_every_shard_unchanged(converted):
    from refq_cli.pipeline.jobs import Job
    from refq_cli.pipeline.uptodate import is_unchanged

    index, spec, artifact = converted
    job = Job(index, spec, artifact, artifact.parent / "m.refq.report.json")
    assert is_unchanged(job)
    rewrite_a_shard(index)
    assert not is_unchanged(job)


def test_verify_checks_every_shard(converted):
    from refq_cli.pipeline.verify import verify

    index, _, artifact = converted
    result = verify(artifact, index)
    assert result["source_matches"] is True and [m["path"] for m in result["modules"]] == ["lstm"]
    rewrite_a_shard(index)  # the index is the same: only a shard's sha256 tells
    assert verify(artifact, index)["source_matches"] is False


def test_the_cli_converts_and_verifies_an_index(converted, tmp_path):
    index, spec, _ = converted
    out = tmp_path / "cli.refq.safetensors"
    run = [sys.executable, "-m", "refq_cli"]
    done = subprocess.run(
        [*run, "convert", str(index), "-q", str(spec), "-o", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert done.returncode == 0 and out.is_file(), done.stderr
    done = subprocess.run(
        [*run, "verify", str(out), "--against", str(index), "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert done.returncode == 0 and json.loads(done.stdout)["source_matches"] is True, done.stderr


def test_source_unchanged_reads_no_torch(tmp_path):
    index = write_sharded(tmp_path, "safetensors")
    recorded = json.dumps(load_checkpoint(index).source)
    code = (
        "import json, sys; from pathlib import Path; "
        "from refq_cli.pipeline.uptodate import source_unchanged; "
        f"print(source_unchanged(json.loads({recorded!r}), Path({str(index)!r}))); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.split() == ["True", "False"], out.stderr


def test_read_tensors_reads_an_index_but_no_calibration_index(tmp_path):
    from refq_cli.io.checkpoint import read_tensors

    index = write_sharded(tmp_path, "bin")
    fmt, digest, tensors = read_tensors(index)
    assert (fmt, digest, sorted(tensors)) == ("state_dict", sha256(index), sorted(tagger_state()))
    with pytest.raises(CheckpointError, match=r"index.json: a sharded checkpoint's index; a "):
        read_tensors(index, what="calibration")


def test_the_report_and_inspect_name_every_shard(tmp_path):
    from typer.testing import CliRunner

    import refq_cli
    from refq_cli.cli.app import app

    index = write_sharded(tmp_path / "hf")
    conversion = refq_cli.convert(index, {"version": 1}, tmp_path / "m.refq.safetensors")
    shards = conversion.report["source"]["shards"]
    assert [s["name"] for s in shards] == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    markdown = conversion.report_md.read_text()
    for shard in shards:
        assert f"- shard `{shard['name']}`: sha256 `{shard['sha256']}`" in markdown
    shown = CliRunner().invoke(app, ["inspect", str(conversion.output)]).stdout
    assert f"  shard: {shards[1]['name']}, sha256 {shards[1]['sha256']}" in shown


def test_a_shard_alone_is_refused_naming_its_index(tmp_path):
    index = write_sharded(tmp_path / "hf")
    shard = index.with_name("model-00001-of-00002.safetensors")
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(shard)
    assert str(caught.value) == (
        f"{shard}: is one shard of the sharded checkpoint {index}; give the index, which reads "
        "every shard as one checkpoint"
    )
    (tmp_path / "hf" / "broken.index.json").write_text("{")  # passed over, not an error
    alone = tmp_path / "hf" / "other.safetensors"
    save_file(tagger_state(), alone)  # beside the index, but listed by none
    assert load_checkpoint(alone).modules
