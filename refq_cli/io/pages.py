"""Handing the memory pages of tensors mapped from a file back to the system once used.

A conversion reads every tensor of a checkpoint once; the pages of a memory-mapped file stay
resident after that unless handed back (``madvise(MADV_DONTNEED)``), so memory would grow with
the whole file. Pages handed back are read from the file again if touched: the tensors stay
valid. Linux only; elsewhere nothing is released.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
from pathlib import Path

import torch

_MADV_DONTNEED = 4
WORTH_RELEASING = 16 << 20  # bytes of checkpoint below which its pages are simply kept


def mapped_ranges(path: Path) -> list[tuple[int, int]]:
    """Address ranges where this process maps ``path`` (Linux; elsewhere none are known)."""
    try:
        maps = Path("/proc/self/maps").read_text()
        inode = os.stat(path).st_ino
    except OSError:
        return []
    real = os.path.realpath(path)
    ranges = []
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[4] == str(inode) and fields[5] == real:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


def drop_pages(t: torch.Tensor, mapped: list[tuple[int, int]]) -> None:
    """``madvise(MADV_DONTNEED)`` over the whole pages of ``t``'s storage inside the mapping:
    resident pages of a file mapping that was only read are dropped, to be read again if
    touched. Never applied to other memory, where it would zero the data."""
    if t.device.type != "cpu" or not mapped:
        return
    storage = t.untyped_storage()
    begin, size = storage.data_ptr(), storage.nbytes()
    page = mmap.PAGESIZE
    start, end = -(-begin // page) * page, (begin + size) // page * page
    if end > start and any(lo <= start and end <= hi for lo, hi in mapped):
        _libc().madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED)


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)
