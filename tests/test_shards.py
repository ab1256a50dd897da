"""Shards: a partition of the jobs that depends on their inputs alone and balances input bytes."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from refq_cli.cli.app import app
from refq_cli.errors import RefqError
from refq_cli.pipeline.jobs import Job
from refq_cli.pipeline.shards import assign_shards, input_bytes, parse_shard, select_shard


def job(name: str, out: str = "out", spec: str = "q.yaml", base: Path | None = None) -> Job:
    stem = Path(name).stem
    return Job(
        Path(name),
        Path(spec),
        Path(out) / f"{stem}.refq.safetensors",
        Path(out) / f"{stem}.refq.report.json",
        base=base,
    )


def sized(sizes: dict[str, int]):
    return lambda path: sizes[Path(path).as_posix()]


inputs = st.dictionaries(
    st.from_regex(r"[a-z0-9_-]{1,6}(/[a-z0-9_-]{1,6})?\.pt", fullmatch=True),
    st.integers(0, 10**9),
    max_size=40,
)


@given(sizes=inputs, shards=st.integers(1, 9), seed=st.integers(0, 1000))
def test_every_job_is_in_exactly_one_shard_whatever_the_order_and_outputs(sizes, shards, seed):
    jobs = [job(name) for name in sizes]
    weigh = sized(sizes)
    assignment = assign_shards(jobs, shards, weigh)
    assert all(0 <= s < shards for s in assignment) and len(assignment) == len(jobs)
    shard_of = {j.input_key: s for j, s in zip(jobs, assignment, strict=True)}
    # Another order, other output folders and another spec: the same shard for each input.
    others = [job(n, out=f"shard{seed}/x", spec="other.yaml") for n in sizes]
    others = random.Random(seed).sample(others, len(others))
    again = assign_shards(others, shards, weigh)
    assert {j.input_key: s for j, s in zip(others, again, strict=True)} == shard_of


@given(sizes=inputs, shards=st.integers(1, 9))
def test_shard_bytes_differ_by_at_most_the_largest_input(sizes, shards):
    jobs = [job(name) for name in sizes]
    loads = [0] * shards
    for j, s in zip(jobs, assign_shards(jobs, shards, sized(sizes)), strict=True):
        loads[s] += sizes[j.input.as_posix()]
    assert max(loads) - min(loads) <= max(sizes.values(), default=0)


@given(count=st.integers(0, 60), shards=st.integers(1, 9))
def test_inputs_of_one_size_spread_evenly(count, shards):
    # The case: 12 files over 3 shards gave 3/2/7 by hash; now 4/4/4.
    jobs = [job(f"m{i}.pt") for i in range(count)]
    counts = [0] * shards
    for s in assign_shards(jobs, shards, lambda _: 1000):
        counts[s] += 1
    assert max(counts) - min(counts) <= 1


def test_jobs_of_one_input_share_a_shard_and_weigh_once_each():
    jobs = [job("a.pt", spec="q1.yaml", out="o1"), job("a.pt", spec="q2.yaml", out="o2")]
    jobs += [job("b.pt"), job("c.pt")]
    assignment = assign_shards(jobs, 2, sized({"a.pt": 10, "b.pt": 10, "c.pt": 10}))
    assert assignment[0] == assignment[1] != assignment[2] == assignment[3]


def test_the_assignment_is_fixed():
    # Every runner of a CI matrix computes this alone: a change here re-partitions every user's
    # matrix. Largest first, each to the lightest shard (ties: fewer inputs, lower number).
    sizes = {"e.pt": 5, "a.pt": 3, "d.pt": 3, "b.pt": 2, "c.pt": 2, "f.pt": 1}
    jobs = [job(n) for n in sorted(sizes)]
    assert assign_shards(jobs, 3, sized(sizes)) == [1, 1, 2, 2, 0, 0]  # 6, 5 and 5 bytes
    assert [j.input.name for j in select_shard(jobs, 1, 1)] == sorted(sizes)


def test_input_key_is_relative_to_the_manifest_or_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    forms = ["m/x.pt", "./m/x.pt", "m/../m/x.pt", str(tmp_path / "m" / "x.pt")]
    assert {job(f).input_key for f in forms} == {"m/x.pt"}
    assert job(str(tmp_path / "a/m/x.pt"), base=tmp_path / "a").input_key == "m/x.pt"


def test_input_bytes_of_files_lfs_pointers_and_what_is_not_a_file(tmp_path):
    (tmp_path / "w.pt").write_bytes(b"\0" * 5000)
    (tmp_path / "small.pt").write_bytes(b"version 1\nsize 99\n")  # not a pointer: 18 bytes
    pointer = "version https://git-lfs.github.com/spec/v1\noid sha256:{}\nsize 123456789\n"
    (tmp_path / "lfs.pt").write_text(pointer.format("ab" * 32))
    os.mkfifo(tmp_path / "fifo.pt")
    assert input_bytes(tmp_path / "w.pt") == 5000
    assert input_bytes(tmp_path / "small.pt") == 18
    assert input_bytes(tmp_path / "lfs.pt") == 123456789
    assert input_bytes(tmp_path / "fifo.pt") == 0  # not opened to wait on it
    assert input_bytes(tmp_path / "missing.pt") == 0
    assert input_bytes(tmp_path) == 0


def test_shards_with_their_own_out_dirs_convert_every_input_once(tmp_path, monkeypatch):
    # The case: 24 inputs, 3 shards, each CI job writing to its own --out-dir, once
    # covered 15 inputs (7 of them twice). Each input is listed by exactly one shard.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    for i in range(24):
        (tmp_path / "models" / f"m{i:02}.pt").write_bytes(b"\0" * (1000 + 37 * i))
    (tmp_path / "q.yaml").write_text("version: 1\n")
    listed: list[str] = []
    loads = []
    for k in (1, 2, 3):
        args = ["convert", "models/*.pt", "-q", "q.yaml", "--out-dir", f"out{k}"]
        result = CliRunner().invoke(app, [*args, "--shard", f"{k}/3", "--list", "--json"])
        assert result.exit_code == 0, result.output
        shard = [j["input"] for j in json.loads(result.stdout)["jobs"]]
        listed += shard
        loads.append(sum(Path(p).stat().st_size for p in shard))
    assert sorted(listed) == sorted(f"models/m{i:02}.pt" for i in range(24))
    assert max(loads) - min(loads) <= 1000 + 37 * 23


def test_a_huge_shard_count_costs_nothing():
    # A heap entry per shard once took 1 GB for 1/10000000 and was killed for 1/10**24.
    jobs = [job("a.pt"), job("b.pt")]
    assert assign_shards(jobs, 10**24, lambda _: 5) == [0, 1]
    assert select_shard(jobs, 10**24, 10**24) == []


def test_shard_text_is_k_slash_n_in_ascii_digits():
    assert parse_shard("2/8") == (2, 8)
    for text in ("+1/2", " 1/2", "1/2 ", "１/２", "1_0/20", "1/2/3", "/2", "0x1/2"):
        with pytest.raises(RefqError, match="write K/N"):
            parse_shard(text)


def test_a_sharded_checkpoint_weighs_its_index_and_every_shard(tmp_path):
    pointer = "version https://git-lfs.github.com/spec/v1\noid sha256:{}\nsize 7000000\n"
    (tmp_path / "a.safetensors").write_bytes(b"\0" * 3000)
    (tmp_path / "b.safetensors").write_text(pointer.format("cd" * 32))  # not pulled: its size
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"x": "a.safetensors", "y": "b.safetensors"}}))
    assert input_bytes(index) == index.stat().st_size + 3000 + 7000000
    broken = tmp_path / "broken.safetensors.index.json"
    broken.write_text("{not json")
    assert input_bytes(broken) == broken.stat().st_size  # its job fails, naming why
    # the heavy index goes alone against two inputs that weigh less together
    (tmp_path / "m1.pt").write_bytes(b"\0" * 4000)
    (tmp_path / "m2.pt").write_bytes(b"\0" * 4000)
    jobs = [job(str(tmp_path / n)) for n in ("m1.pt", "m2.pt", index.name)]
    assert assign_shards(jobs, 2) == [1, 1, 0]
