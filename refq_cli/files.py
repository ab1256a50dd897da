"""Writing outputs safely: checks before any work, and files that appear whole or not at all.

Plain Python: importing this does not import torch.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from refq_cli.errors import ArtifactError


def check_outputs(
    outputs: Mapping[str, Path], inputs: Mapping[str, Path], *, force: bool = False
) -> None:
    """Refuse output paths that collide with each other or with an input, sit in a missing
    folder, or exist without ``force``. Keys name the flag or file each path came from."""
    checked: dict[str, Path] = {}
    for flag, path in outputs.items():
        for other_flag, other in checked.items():
            if path.resolve() == other.resolve() or _same_file(path, other):
                raise ArtifactError(
                    f"{flag} {path}: the same file as {other_flag}; give each output its own path"
                )
        for input_name, source in inputs.items():
            if _same_file(path, source):
                raise ArtifactError(
                    f"{flag} {path}: would overwrite the {input_name} {source}; pick another path"
                )
        if path.is_dir():
            raise ArtifactError(f"{flag} {path}: is a directory")
        if not path.parent.is_dir():
            raise ArtifactError(f"{flag} {path}: the folder {path.parent} does not exist")
        if path.exists() and not force:
            raise ArtifactError(f"{flag} {path}: already exists; pass --force to overwrite it")
        checked[flag] = path


def write_atomic(path: Path, write: Any, *, force: bool = False) -> None:
    """Write a file through ``write(tmp_path)`` beside ``path``, then move it into place.

    Never overwrites without ``force`` and never leaves a partial file at ``path``: a failure
    removes the temporary file and keeps any old one.
    """
    check_outputs({"output": path}, {}, force=force)
    _remove_stale_temporaries(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot write: {exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)


def _remove_stale_temporaries(path: Path) -> None:
    """Temporary files of this output left by a process that was killed mid-write."""
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = tmp.name[len(path.name) + 2 : -len(".tmp")]
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and os.path.samefile(a, b))
    except OSError:
        return False
