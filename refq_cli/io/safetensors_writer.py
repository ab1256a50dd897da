"""Writing safetensors files: tensor by tensor, block by block, into a temporary that moves into
place whole (through :class:`refq_cli.io.outputs.Outputs`), with a header of bounded size."""

from __future__ import annotations

import ctypes
import errno
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from refq_cli.errors import ArtifactError
from refq_cli.io.header import MAX_HEADER_BYTES
from refq_cli.io.outputs import Outputs

_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    **{
        getattr(torch, name): code
        for name, code in (
            ("uint16", "U16"),
            ("uint32", "U32"),
            ("uint64", "U64"),
            ("float8_e4m3fn", "F8_E4M3"),
            ("float8_e5m2", "F8_E5M2"),
        )
        if hasattr(torch, name)
    },
}


def write_safetensors(
    path: Path,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    *,
    force: bool = False,
) -> None:
    """Write a safetensors file of ``tensors`` in one go, through :class:`SafetensorsWriter`."""
    check_header_fits(tensors, sum(len(k) + len(v) for k, v in metadata.items()), path=path)
    with SafetensorsWriter(path, force=force) as writer:
        for name, tensor in tensors.items():
            writer.add(name, tensor)
        writer.finish(metadata)


_ENTRY_BYTES = len('"":{"dtype":"U8","shape":[],"data_offsets":[0,0]},')  # the least per tensor


def check_header_fits(
    names: Iterable[str], metadata_bytes: int = 0, *, path: Path | str = "the artifact"
) -> None:
    """Refuse, before any work, tensors whose header could not be read back: at least
    ``metadata_bytes`` of metadata and the least each name's entry takes are over the limit."""
    size = metadata_bytes
    for count, name in enumerate(names, 1):
        size += len(json.dumps(name)) - 2 + _ENTRY_BYTES
        if size > MAX_HEADER_BYTES:
            raise _too_large(path, f"{count}+ tensors")


def _too_large(path: Path | str, what: str) -> ArtifactError:
    return ArtifactError(
        f"{path}: the header of {what} would be over {MAX_HEADER_BYTES:,} bytes, which neither "
        "refq nor safetensors reads back; convert fewer tensors or give them shorter names"
    )


class SafetensorsWriter:
    """Writes a safetensors file tensor by tensor, block by block, then moves it into place.

    The header comes first in the file but is known only at the end (it holds the metadata),
    so tensor bytes go to an unlinked temporary file as they come, and :meth:`finish` writes the
    header beside ``path`` and copies the data after it inside the kernel. Memory use is one
    block, whatever the file's size. Tensors are stored in the order they were added, metadata
    keys sorted: equal inputs give equal bytes (the safetensors library orders metadata by
    hash, and holds every tensor's bytes at once). The file appears at ``path`` complete or not
    at all; leaving the ``with`` block without :meth:`finish` writes nothing. A header over
    the limit of readers is refused as soon as the tensors begun reach it.

    ``outputs``, the run's checked outputs with ``path`` among them, makes :meth:`finish`
    stage the file there for the run to commit with its other files; without it the writer
    checks ``path`` now (every output rule, with ``force``) and moves the file into place in
    :meth:`finish`.
    """

    def __init__(self, path: Path, *, force: bool = False, outputs: Outputs | None = None) -> None:
        self.path = path
        self._own = outputs is None
        self.outputs = Outputs({"output": path}, {}, force=force) if outputs is None else outputs
        try:
            self._data = tempfile.TemporaryFile(dir=path.parent)  # noqa: SIM115 (closed on exit)
        except OSError as exc:
            self._close_outputs()
            raise ArtifactError(f"{path}: cannot write: {exc.strerror or exc}") from None
        self._header_bytes = 2  # the braces of the header
        self._entries: dict[str, dict[str, Any]] = {}
        self._open: tuple[str, int] | None = None  # the tensor being written, its end offset
        self.size = 0  # bytes of tensor data so far

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._data.close()
        self._close_outputs()

    def _close_outputs(self) -> None:
        if self._own:
            self.outputs.close()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Store a whole tensor."""
        self.begin(name, tensor.dtype, tuple(tensor.shape))
        self.write(tensor)
        self.end()

    def begin(self, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
        """Start tensor ``name``; its bytes follow through :meth:`write`, in row-major order."""
        if dtype not in _SAFETENSORS_DTYPES:
            raise ArtifactError(
                f"{self.path}: tensor {name!r} has dtype {str(dtype).removeprefix('torch.')}, "
                "which safetensors cannot store"
            )
        if name in self._entries:
            raise ArtifactError(f"{self.path}: tensor {name!r} is written twice")
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        entry = {
            "dtype": _SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [self.size, self.size + nbytes],
        }
        self._header_bytes += len(json.dumps({name: entry}, separators=(",", ":")))  # with a comma
        if self._header_bytes > MAX_HEADER_BYTES:
            raise _too_large(self.path, f"{len(self._entries) + 1}+ tensors")
        self._entries[name] = entry
        self._open = (name, self.size + nbytes)

    def write(self, block: torch.Tensor) -> None:
        """The next bytes of the tensor begun last."""
        block = block.detach().to("cpu").contiguous()
        nbytes = block.numel() * block.element_size()
        if nbytes:
            self._write_bytes((ctypes.c_char * nbytes).from_address(block.data_ptr()))
        self.size += nbytes

    def end(self) -> None:
        """Close the tensor begun last, which must have received all its bytes."""
        if self._open is None or self.size != self._open[1]:
            raise RuntimeError(f"{self.path}: tensor {self._open} got {self.size} bytes in all")
        self._open = None

    def _write_bytes(self, data: Any) -> None:
        try:
            self._data.write(data)
        except OSError as exc:
            raise ArtifactError(f"{self.path}: cannot write: {exc.strerror or exc}") from None

    def finish(self, metadata: Mapping[str, str]) -> None:
        """Write the header and the data to ``path``, atomically (or stage them in the run's
        ``outputs``)."""
        entries = {"__metadata__": dict(sorted(metadata.items())), **self._entries}
        header = json.dumps(entries, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)
        if len(header) > MAX_HEADER_BYTES:
            raise _too_large(self.path, f"{len(self._entries)} tensors and their metadata")
        try:
            self._data.flush()
        except OSError as exc:
            raise ArtifactError(f"{self.path}: cannot write: {exc.strerror or exc}") from None

        def write(f: Any) -> None:
            f.write(len(header).to_bytes(8, "little"))
            f.write(header)
            f.flush()
            _copy_data(self._data, f, self.size)

        self.outputs.write(self.path, write)
        if self._own:
            self.outputs.commit()


def _copy_data(source: Any, target: Any, size: int) -> None:
    """Append the ``size`` bytes of ``source`` to ``target``, inside the kernel where it can."""
    begin = target.tell()
    done = 0
    try:
        while done < size:
            copied = os.copy_file_range(source.fileno(), target.fileno(), size - done, done)
            if copied == 0:  # some file systems copy nothing rather than refuse
                break
            done += copied
    except (AttributeError, OSError) as exc:  # no copy_file_range here, or not between these
        if isinstance(exc, OSError) and exc.errno not in _NO_KERNEL_COPY:
            raise
    if done < size:
        source.seek(done)
        target.seek(begin + done)
        shutil.copyfileobj(source, target, 1 << 20)
        target.flush()
    if target.tell() != begin + size:
        raise OSError(errno.EIO, f"copied {target.tell() - begin} of {size} data bytes")


_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}
