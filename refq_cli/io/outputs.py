"""Writing outputs safely: one mechanism for every file refq writes.

:class:`Outputs` is one run's outputs. Built before any work, it checks them against each other
and against every input of the run, through links of files and of folders (and hard links):
never an input, even with ``--force``; never an existing file without ``--force`` (unless its
``replaceable`` test says it is refq's own output that may be replaced); never a link, a
directory, a FIFO or a device. An output's folder that does not exist is checked (its nearest
existing folder must be a writable folder) and made once every output passed its checks;
:func:`check_outputs`, the check before any work, makes none, so that a run refused before its
work leaves no folder behind. :meth:`Outputs.write` stages a file
in a temporary beside its target, created exclusively under an unpredictable name and locked
while it exists;
:meth:`Outputs.commit` checks again and moves every staged file into place at once, holding
each output folder's lock, so that the files of one run (an artifact and its reports) always
come from that run. A temporary whose lock can be taken belongs to no live writer: later runs
remove it (PIDs are never trusted: another PID namespace reuses them).

Plain Python: importing this does not import torch.
"""

from __future__ import annotations

import fcntl
import os
import re
import secrets
import stat
from collections.abc import Callable, Iterable, Mapping
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from refq_cli.errors import ArtifactError, argument

TEMP_SUFFIX = ".tmp"
_TOKEN_CHARS = 16  # hex digits of the random part of a temporary's name
_NAME_KEPT = 200  # characters of the output's name kept in its temporaries' names

Paths = Mapping[str, Path] | Iterable[tuple[str, Path]]
Replaceable = Callable[[Path], bool]


@dataclass
class _Output:
    flag: str
    path: Path
    name: str
    folder: int | None  # index into Outputs._folders; None: a folder to create, not open yet
    seen: tuple[int, int] | None  # (device, inode) of what was there when checked
    tmp: str | None = None  # the staged temporary's name in the folder
    tmp_fd: int | None = None  # open, and locked, while the temporary exists


class Outputs:
    """One run's output files, checked at once (see the module's docstring); a context manager
    that removes whatever it staged and did not commit.

    ``outputs`` and ``inputs`` are (description, path) pairs or a mapping of them: the
    description names the flag or file in messages. An output's description that is the name
    of an argument of refq's API (``output``, ``report``, ``summary_md``; optionally followed
    by a note in brackets, ``output (rejected)``) is shown as messages name arguments
    (:func:`refq_cli.errors.argument`: ``--output out/a.st`` from the CLI, ``output='out/a.st'``
    from Python). ``replaceable[description](path)`` says whether an existing output may be
    replaced without ``force``.
    """

    def __init__(
        self,
        outputs: Paths,
        inputs: Paths,
        *,
        force: bool = False,
        replaceable: Mapping[str, Replaceable] | None = None,
        make_folders: bool = True,
    ) -> None:
        self.force = force
        self.inputs = [(d, p) for d, p in _pairs(inputs) if p is not None]
        self._replaceable = replaceable or {}
        self._folders: list[tuple[Path, int]] = []  # (folder, its open fd)
        self._outputs: list[_Output] = []
        try:
            for flag, path in _pairs(outputs):
                self._add(flag, Path(path))
            if make_folders:  # every output passed its checks: the missing folders now
                for out in self._outputs:
                    self._make_folder(out)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Outputs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- checking ---------------------------------------------------------------------------

    def _add(self, flag: str, path: Path) -> None:
        folder = path.parent
        who = _who(flag, path)
        if path.name in ("", ".", "..") or os.path.isdir(path):
            raise ArtifactError(f"{who}: is a directory; give a file path")
        existing = folder
        if not folder.is_dir():
            if os.path.lexists(folder):
                raise ArtifactError(f"{who}: the folder {folder} is not a directory")
            existing = _existing_ancestor(folder)
            if not existing.is_dir():
                raise ArtifactError(
                    f"{who}: cannot create the folder {folder}: {existing} is not a directory"
                )
        names = _names(path)
        inode = _inode(path)
        for description, source in self.inputs:
            if names & _names(source) or (inode is not None and inode == _inode(source)):
                raise ArtifactError(
                    f"{who}: would overwrite the {description} {source}; pick another path"
                )
        for other in self._outputs:
            if names & _names(other.path) or (inode is not None and inode == _inode(other.path)):
                raise ArtifactError(
                    f"{who}: the same file as {_who(other.flag, other.path)}; give each output "
                    "its own path"
                )
        seen = self._check_existing(flag, path)
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ArtifactError(f"{who}: the folder {existing} is not writable")
        index = self._folder(flag, path) if existing is folder else None
        self._outputs.append(_Output(flag, path, path.name, index, seen))

    def _check_existing(self, flag: str, path: Path) -> tuple[int, int] | None:
        """What is at ``path`` now, if refq may replace it; refuses what it may not."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ArtifactError(
                f"{_who(flag, path)}: cannot check it: {exc.strerror or exc}"
            ) from None
        _refuse_odd(flag, path, st.st_mode)
        if not self.force:
            test = self._replaceable.get(flag)
            if test is None or not test(path):
                raise ArtifactError(
                    f"{_who(flag, path)}: already exists; pass {argument('force')} to overwrite it"
                )
        return (st.st_dev, st.st_ino)

    def _make_folder(self, out: _Output) -> None:
        """Make (and open) the output's folder, checked when it was added, if it is missing."""
        if out.folder is not None:
            return
        try:
            out.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ArtifactError(
                f"{_who(out.flag, out.path)}: cannot create the folder {out.path.parent}: "
                f"{exc.strerror or exc}"
            ) from None
        out.folder = self._folder(out.flag, out.path)

    def _folder(self, flag: str, path: Path) -> int:
        try:
            fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise ArtifactError(
                f"{_who(flag, path)}: cannot open the folder {path.parent}: {exc.strerror or exc}"
            ) from None
        st = os.fstat(fd)
        for i, (_, other) in enumerate(self._folders):
            there = os.fstat(other)
            if (there.st_dev, there.st_ino) == (st.st_dev, st.st_ino):
                os.close(fd)  # one fd per folder: flock on two of them would deadlock
                return i
        self._folders.append((path.parent, fd))
        return len(self._folders) - 1

    # --- writing ----------------------------------------------------------------------------

    def write(self, path: Path, content: bytes | Callable[[BinaryIO], None]) -> None:
        """Stage the output ``path`` (as it was given): ``content``, or what ``content(file)``
        writes. Nothing appears at ``path`` before :meth:`commit`."""
        out = next((o for o in self._outputs if o.path == Path(path)), None)
        if out is None:
            raise ValueError(f"{path} is not one of the checked outputs")
        self._discard(out)
        self._make_folder(out)
        assert out.folder is not None
        dir_fd = self._folders[out.folder][1]
        try:
            with _Lock(dir_fd, fcntl.LOCK_EX):  # no cleanup between creating and locking
                _remove_stale(dir_fd, out.name, {_inode(p) for _, p in self.inputs})
                out.tmp, out.tmp_fd = _create_temporary(dir_fd, out.name)
            with os.fdopen(os.dup(out.tmp_fd), "wb") as f:
                if isinstance(content, bytes):
                    f.write(content)
                else:
                    content(f)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            self._discard(out)
            raise ArtifactError(
                f"{_who(out.flag, out.path)}: cannot write: {exc.strerror or exc}"
            ) from None
        except BaseException:
            self._discard(out)
            raise

    def commit(self) -> None:
        """Move every staged file into place, after checking each target again, holding the
        lock of every output folder: a concurrent run's files are all before or all after."""
        staged = [o for o in self._outputs if o.tmp is not None]
        folders = sorted(
            {o.folder for o in staged if o.folder is not None},
            key=lambda i: _key(self._folders[i][1]),
        )
        current = staged[0] if staged else None
        try:
            for i in folders:
                fcntl.flock(self._folders[i][1], fcntl.LOCK_EX)
            for out in staged:
                current = out
                self._recheck(out)
            for out in staged:
                current = out
                dir_fd = self._folders[out.folder][1]
                os.rename(out.tmp, out.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)  # type: ignore[arg-type]
                out.tmp = None
            for i in folders:
                with suppress(OSError):  # some file systems cannot sync a folder; files are synced
                    os.fsync(self._folders[i][1])
        except OSError as exc:
            assert current is not None
            raise ArtifactError(
                f"{_who(current.flag, current.path)}: cannot write: {exc.strerror or exc}"
            ) from None
        finally:
            for i in folders:
                with suppress(OSError):
                    fcntl.flock(self._folders[i][1], fcntl.LOCK_UN)
            for out in staged:
                self._discard(out)

    def _recheck(self, out: _Output) -> None:
        """Inputs may have become links, and files may have appeared, while refq worked."""
        assert out.folder is not None  # staged, so its folder is open
        who = _who(out.flag, out.path)
        dir_fd = self._folders[out.folder][1]
        target = os.path.join(_folder_path(*self._folders[out.folder]), out.name)
        for description, source in self.inputs:
            if target in _names(source):
                raise ArtifactError(
                    f"{who}: would overwrite the {description} {source} (it became a link "
                    "while refq ran); nothing was written"
                )
        try:
            st = os.stat(out.name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise ArtifactError(f"{who}: cannot check it: {exc.strerror or exc}") from None
        _refuse_odd(out.flag, out.path, st.st_mode)
        now = (st.st_dev, st.st_ino)
        if now in {_inode(source) for _, source in self.inputs}:
            raise ArtifactError(
                f"{who}: became a link of an input while refq ran; nothing was written"
            )
        if not self.force and now != out.seen:
            raise ArtifactError(
                f"{who}: was created while refq ran; pass {argument('force')} to overwrite it"
            )

    # --- cleaning up ------------------------------------------------------------------------

    def _discard(self, out: _Output) -> None:
        """Remove the output's staged temporary, if any; never raises over the real error."""
        if out.tmp is not None and out.folder is not None:
            with suppress(OSError):
                os.unlink(out.tmp, dir_fd=self._folders[out.folder][1])
        out.tmp = None
        if out.tmp_fd is not None:
            os.close(out.tmp_fd)
            out.tmp_fd = None

    def close(self) -> None:
        for out in self._outputs:
            self._discard(out)
        for _, fd in self._folders:
            os.close(fd)
        self._folders = []


def check_outputs(
    outputs: Paths,
    inputs: Paths,
    *,
    force: bool = False,
    replaceable: Mapping[str, Replaceable] | None = None,
) -> None:
    """Refuse outputs that :class:`Outputs` would refuse, now, before any work (making no
    folder)."""
    Outputs(outputs, inputs, force=force, replaceable=replaceable, make_folders=False).close()


def write_file(
    path: Path,
    content: bytes | Callable[[BinaryIO], None],
    *,
    inputs: Paths = (),
    force: bool = False,
    flag: str = "output",
    replaceable: Replaceable | None = None,
) -> None:
    """Write one output file through :class:`Outputs`: checked, staged, moved into place."""
    tests = {flag: replaceable} if replaceable is not None else None
    with Outputs({flag: path}, inputs, force=force, replaceable=tests) as outputs:
        outputs.write(path, content)
        outputs.commit()


def starts_with(prefix: bytes | re.Pattern[bytes], size: int = 64) -> Replaceable:
    """A ``replaceable`` test: the file's first bytes are ``prefix``, or match it (a pattern
    matched against the first ``size`` bytes)."""

    def test(path: Path) -> bool:
        try:
            with open(path, "rb", opener=_without_blocking) as f:
                if isinstance(prefix, bytes):
                    return f.read(len(prefix)) == prefix
                return prefix.match(f.read(size)) is not None
        except OSError:
            return False

    return test


# --- helpers ----------------------------------------------------------------------------------


def _pairs(paths: Paths) -> list[tuple[str, Path]]:
    return list(paths.items()) if isinstance(paths, Mapping) else list(paths)


_ARGUMENT = re.compile(r"([a-z][a-z_]*)( \(.+\))?")  # "output", "output (rejected)"


def _who(flag: str, path: Path) -> str:
    """How a message names the output ``path`` described by ``flag`` (see :class:`Outputs`)."""
    named = _ARGUMENT.fullmatch(flag)
    if named is None:
        return f"{flag} {path}"
    return argument(named[1], path) + (named[2] or "")


def _existing_ancestor(folder: Path) -> Path:
    """The nearest of ``folder``'s parents that is there (a folder, a file or a link)."""
    for parent in folder.parents:
        if os.path.lexists(parent):
            return parent
    return Path(".")  # the last parent of a relative path


def _names(path: Path) -> set[str]:
    """The directory entries writing ``path`` could replace or write through: the name itself
    in its real folder, and where its links lead."""
    path = Path(os.path.abspath(path))
    return {os.path.join(os.path.realpath(path.parent), path.name), os.path.realpath(path)}


def _inode(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return (st.st_dev, st.st_ino)


def _folder_path(folder: Path, fd: int) -> str:
    """Where the open folder ``fd`` is now (``folder`` resolved, where /proc cannot say)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return os.path.realpath(folder)


def _key(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino)


def _refuse_odd(flag: str, path: Path, mode: int) -> None:
    who = _who(flag, path)
    if stat.S_ISLNK(mode):
        raise ArtifactError(f"{who}: is a symbolic link; give the path of a file")
    if stat.S_ISDIR(mode):
        raise ArtifactError(f"{who}: is a directory; give a file path")
    if not stat.S_ISREG(mode):
        raise ArtifactError(f"{who}: is not a regular file (a FIFO, device or socket)")


def _temporary_prefix(name: str) -> str:
    return f".{name[:_NAME_KEPT]}."


def _create_temporary(dir_fd: int, name: str) -> tuple[str, int]:
    """A new file, created exclusively (never through a link), under a random name, locked.
    Its permissions are those of any new file (the umask's), which it keeps once in place."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    while True:
        tmp = _temporary_prefix(name) + secrets.token_hex(_TOKEN_CHARS // 2) + TEMP_SUFFIX
        try:
            fd = os.open(tmp, flags, 0o666, dir_fd=dir_fd)
        except FileExistsError:
            continue
        fcntl.flock(fd, fcntl.LOCK_EX)
        return tmp, fd


def _remove_stale(dir_fd: int, name: str, inputs: set[tuple[int, int] | None]) -> None:
    """Remove temporaries of output ``name`` that no live writer holds (their lock is free),
    never one of the run's ``inputs`` (device and inode), whatever its name. Called holding
    the folder's lock. Never raises: cleaning up is no reason to fail."""
    prefix = _temporary_prefix(name)
    try:
        entries = os.listdir(dir_fd)
    except OSError:
        return
    for entry in entries:
        token = entry[len(prefix) : -len(TEMP_SUFFIX)]
        if not (
            entry.startswith(prefix)
            and entry.endswith(TEMP_SUFFIX)
            and len(token) == _TOKEN_CHARS
            and all(c in "0123456789abcdef" for c in token)
        ):
            continue
        try:
            fd = os.open(
                entry, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd
            )
        except OSError:
            continue  # a link, or gone: not ours to remove
        try:
            status = os.fstat(fd)
            if not stat.S_ISREG(status.st_mode) or (status.st_dev, status.st_ino) in inputs:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # a live writer holds it
            os.unlink(entry, dir_fd=dir_fd)
        except OSError:
            pass
        finally:
            os.close(fd)


def _without_blocking(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NONBLOCK)


class _Lock:
    """``flock`` on an open file for a ``with`` block."""

    def __init__(self, fd: int, how: int) -> None:
        self.fd, self.how = fd, how

    def __enter__(self) -> None:
        fcntl.flock(self.fd, self.how)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
