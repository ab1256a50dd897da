"""Shards: a partition of the jobs that every runner of a CI matrix computes alone, from the
jobs' inputs only, balanced by input bytes."""

from __future__ import annotations

import heapq
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from refq_cli.errors import RefqError, argument
from refq_cli.io.inputs import read_at_most
from refq_cli.pipeline.jobs import Job, checkpoint_files


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` with 1 <= K <= N: shard K of N (ASCII digits, nothing else)."""
    match = re.fullmatch(r"([0-9]+)/([0-9]+)", text)
    if match is None:
        raise RefqError(f"{argument('shard', text)}: write K/N, for example 2/8")
    k, n = int(match[1]), int(match[2])
    if not 1 <= k <= n:
        raise RefqError(f"{argument('shard', text)}: K must be between 1 and N")
    return k, n


_LFS_POINTER = b"version https://git-lfs.github.com/spec/v1\n"
_LFS_POINTER_MAX = 1024  # bytes: Git LFS pointer files are about 130


def input_bytes(path: Path) -> int:
    """The size of an input as sharding weighs it: the sum of :func:`file_bytes` over the files
    it is read from (a sharded checkpoint's index and every shard it names)."""
    return sum(file_bytes(file) for file in checkpoint_files(path))


def file_bytes(path: Path) -> int:
    """The size of a file as sharding weighs it: its size on disk, or for a Git LFS pointer
    the size of the file it stands for (so runners that pulled it and runners that did not
    agree); 0 for what is not a regular file (the job fails later, naming why)."""
    try:
        head = read_at_most(path, _LFS_POINTER_MAX)
        size = os.stat(path).st_size
    except OSError:
        return 0
    if head.startswith(_LFS_POINTER):
        for line in head.decode("ascii", "replace").splitlines():
            key, _, value = line.partition(" ")
            if key == "size" and value.isdigit():
                return int(value)
    return size


def assign_shards(
    jobs: Sequence[Job], shards: int, weigh: Callable[[Path], int] = input_bytes
) -> list[int]:
    """The shard (0-based) of each job: the same on every runner given the same jobs in any
    order, whatever their outputs, with the input bytes of the shards as even as greedy
    balancing makes them. Jobs of one input go together; inputs, largest first (ties by
    path), each join the shard with the fewest bytes so far (then the fewest inputs, then the
    lowest number). The largest and smallest shard differ by at most the largest weight of one
    input: its size, times its jobs."""
    sizes: dict[str, int] = {}
    weight: dict[str, int] = {}  # bytes an input costs its shard: its size, once per job
    for job in jobs:
        key = job.input_key
        if key not in sizes:
            sizes[key] = weigh(job.input)
        weight[key] = weight.get(key, 0) + sizes[key]
    # (bytes, inputs, shard): a heap. The first inputs each take an empty shard, lowest first,
    # so shards past the number of inputs never get one: they need no place in it.
    loads = [(0, 0, s) for s in range(min(shards, len(weight)))]
    shard_of: dict[str, int] = {}
    for key in sorted(weight, key=lambda k: (-weight[k], k)):
        load, count, shard = heapq.heappop(loads)
        shard_of[key] = shard
        heapq.heappush(loads, (load + weight[key], count + 1, shard))
    return [shard_of[job.input_key] for job in jobs]


def select_shard(jobs: Sequence[Job], k: int, n: int) -> list[Job]:
    """The jobs of shard ``k`` of ``n`` (1-based), in their order: see :func:`assign_shards`."""
    return [job for job, shard in zip(jobs, assign_shards(jobs, n), strict=True) if shard == k - 1]
