"""Jobs: one checkpoint converted with one spec to one artifact and its reports; where their
outputs go (and, when a gate is missed, go aside), which of refq's own files an output may
replace, and the check of every output of a run against every input before any work."""

from __future__ import annotations

import glob
import json
import os
import stat
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from refq_cli.errors import RefqError, argument, did_you_mean, names_flags
from refq_cli.io.outputs import Replaceable, check_outputs, starts_with
from refq_cli.io.sharded import INDEX_SUFFIX, is_index, read_index

if TYPE_CHECKING:
    from refq_cli.spec.spec import Spec

ARTIFACT_SUFFIX = ".refq.safetensors"
# The names refq gives its outputs: a glob never matches them (an artifact is no input, and an
# --out-dir inside the input tree is not converted again on the next run).
OWN_OUTPUT_SUFFIXES = tuple(
    f".refq{aside}{end}"
    for aside in ("", ".rejected")
    for end in (".safetensors", ".report.json", ".report.md")
)
REPORT_MD_HEADING = "# refq conversion report"  # what report.to_markdown starts with
SUMMARY_HEADING = "## refq batch conversion"
_REPORT_LIMIT = 1 << 26  # bytes of a JSON report read to tell whether refq wrote it


@dataclass(frozen=True)
class Job:
    """One conversion. Its shard depends on its input alone (:attr:`input_key`)."""

    input: Path
    spec: Path
    output: Path
    report: Path
    calibration: Path | None = None
    min_sqnr: float | None = None
    base: Path | None = None  # the manifest's folder: keys are relative to it

    @property
    def input_key(self) -> str:
        """The input's path relative to the manifest's folder (to the working directory for
        ``refq convert``): the same on every machine that checks the project out anywhere."""
        return Path(os.path.relpath(self.input, self.base or os.getcwd())).as_posix()

    @property
    def report_md(self) -> Path:
        return self.report.with_suffix(".md")

    def outputs(self, flags: bool = False) -> list[tuple[str, Path]]:
        """The job's output files, described by the arguments that name them (one job of
        ``refq convert``: ``output`` and ``report``, which messages show as ``--output`` or
        ``output=``, see :class:`refq_cli.io.outputs.Outputs`) or by the job's input (one of
        several)."""
        if flags:
            return [
                ("output", self.output),
                ("report", self.report),
                ("the Markdown report", self.report_md),
            ]
        return [
            (f"the output of {self.input}", self.output),
            (f"the report of {self.input}", self.report),
            (f"the Markdown report of {self.input}", self.report_md),
        ]

    def inputs(self) -> list[tuple[str, Path]]:
        """Every file the job reads, which no output may replace: the input (an index and each
        of its shards), the spec and the calibration file."""
        shards = [("input shard", shard) for shard in checkpoint_files(self.input)[1:]]
        found = [("input", self.input), *shards, ("spec", self.spec)]
        return found + ([("calibration file", self.calibration)] if self.calibration else [])


def checkpoint_files(path: Path) -> list[Path]:
    """The files an input is read from: ``[path]``, or an index and its shards. For an index
    refq will refuse (its job fails, naming why), the shards it names all the same when it
    can be read (so that no output replaces one), else ``[path]``."""
    if not is_index(path):
        return [path]
    try:
        index = read_index(path)
    except RefqError:
        return [path]
    return [path, *(index.shard_path(name) for name in index.shards)]


def replaceable_outputs(job: Job, flags: bool = False) -> dict[str, Callable[[Path], bool]]:
    """What ``--skip-unchanged`` may replace without ``--force``: refq's own outputs of the
    kind each file is (an out-of-date artifact, its reports), never another file."""
    tests = (_is_artifact, _is_report, starts_with(REPORT_MD_HEADING.encode()))
    return {flag: test for (flag, _), test in zip(job.outputs(flags), tests, strict=True)}


def _is_artifact(path: Path) -> bool:
    from refq_cli.io.header import read_header

    try:
        read_header(path)
    except RefqError:
        return False
    return True


def _is_report(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            text = f.read(_REPORT_LIMIT + 1)
        report = json.loads(text) if len(text) <= _REPORT_LIMIT else None
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(report, dict) and {"refq_version", "source", "totals"} <= set(report)


def check_run(
    jobs: Sequence[Job],
    options: Options,
    *,
    summary: Path | None = None,
    inputs: Sequence[tuple[str, Path]] = (),
) -> Options:
    """Check every output of a run of ``jobs`` (and the summary) before any work: against each
    other and every input of the run (``inputs`` adds to the jobs' own: the manifest). Returns
    the options for the jobs, which carry the run's inputs so that each job protects them all."""
    by_flags = len(jobs) == 1 and not inputs
    protected = [*inputs, *(pair for job in jobs for pair in job.inputs())]
    outputs: list[tuple[str, Path]] = []
    replaceable: dict[str, Replaceable] = {}
    for job in jobs:
        paths, tests = job_outputs(job, by_flags, options.skip_unchanged)
        outputs += paths
        replaceable |= tests
    if summary is not None:
        outputs.append(("summary_md", summary))
        replaceable["summary_md"] = is_summary
    check_outputs(outputs, protected, force=options.force, replaceable=replaceable)
    return replace(options, protected=tuple(protected), by_flags=by_flags)


def is_summary(path: Path) -> bool:
    """Whether ``path`` holds a summary refq wrote, which --summary-md replaces."""
    return starts_with(SUMMARY_HEADING.encode())(path)


def artifact_name(input_path: Path) -> str:
    """The default name of an input's artifact: its stem + ``.refq.safetensors``; for a sharded
    checkpoint's index, the name without ``.index.json`` and the weights' suffix
    (``model.safetensors.index.json`` -> ``model.refq.safetensors``)."""
    name = input_path.name
    if is_index(name):
        stem = Path(name.removesuffix(INDEX_SUFFIX)).stem
        if stem:
            return stem + ARTIFACT_SUFFIX
    return input_path.stem + ARTIFACT_SUFFIX


def file_argument(name: str, value: str | os.PathLike[str]) -> Path:
    """The file path the caller gave as argument ``name`` (``output``, ``report``): not empty,
    not a folder's name (``.``, ``..``, a trailing ``/``), which :func:`output_paths` would
    otherwise take apart."""
    text = os.fspath(value) if isinstance(value, (str, os.PathLike)) else None
    if not isinstance(text, str):
        raise RefqError(f"{argument(name, value)}: give a file path")
    if not text or text.endswith(("/", os.sep)) or Path(text).name in ("", ".", ".."):
        raise RefqError(
            f"{argument(name, text)}: names a folder, not a file; give a file path"
            + (f" (a folder for the artifacts is {argument('out_dir', text)})" if text else "")
        )
    return Path(text)


def check_device(device: str) -> str:
    """``device`` when it names a device refq converts on (``cpu``, ``cuda``, ``cuda:N``), told
    without torch, before any work; whether CUDA is there is known once torch is."""
    if not isinstance(device, str) or not (
        device in ("cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())
    ):
        raise RefqError(f"{argument('device', device)}: use cpu or cuda (cuda:N for GPU N)")
    return device


def output_paths(
    input_path: Path,
    output: Path | None = None,
    out_dir: Path | None = None,
    report: Path | None = None,
) -> tuple[Path, Path]:
    """(artifact, report JSON) for an input: ``output``, or :func:`artifact_name` in ``out_dir``
    (default: beside the input); the report beside the artifact by default."""
    if output is None:
        folder = out_dir if out_dir is not None else input_path.parent
        output = folder / artifact_name(input_path)
    if report is None:
        report = output.with_name(output.name.removesuffix(".safetensors") + ".report.json")
    elif report.suffix == ".md":
        raise RefqError(
            f"{argument('report', report)}: give the JSON path; the Markdown report is written "
            "beside it with .md"
        )
    return output, report


def normalized(path: str | os.PathLike[str]) -> Path:
    """``path`` without its ``.`` and ``..`` components (``examples/ci/../models/a.pt`` ->
    ``examples/models/a.pt``) when that names the same place: when the file system resolves
    both alike (``os.path.realpath``; a ``..`` after a symbolic link is the link's target's
    parent, which the text cannot tell); else ``path`` as written. Relative paths stay
    relative. Unlike ``os.path.samefile`` this holds for outputs that do not exist yet."""
    text = os.fspath(path)
    tidy = os.path.normpath(text)
    if tidy == text or os.path.realpath(tidy) == os.path.realpath(text):
        return Path(tidy)
    return Path(text)


def _named(name: str) -> str:
    """How a message names argument ``name`` without a value: ``--root`` or ``root``."""
    return argument(name) if names_flags() else name


@dataclass(frozen=True)
class Input:
    """An input as found: its path and, when a glob matched it, the glob and its fixed part
    (:func:`glob_folder`), which its folder is mirrored from under an output folder."""

    path: Path
    glob: str | None = None  # None: given as a path
    folder: Path | None = None


def glob_folder(pattern: str) -> Path:
    """A glob's fixed part: its leading folders without a glob character (``models`` of
    ``models/**/*.pt``, ``.`` of ``*.pt``, ``/`` of ``/*/m.pt``), which the matches' folders
    are mirrored from under an output folder."""
    fixed: list[str] = []
    for part in Path(pattern).parts[:-1]:
        if glob.has_magic(part):
            break
        fixed.append(part)
    return normalized(Path(*fixed)) if fixed else Path(".")


def find_inputs(patterns: Iterable[str], base: Path | None = None) -> list[Input]:
    """Paths and globs (each sorted, ``**`` allowed) to inputs, in order, each once, paths
    :func:`normalized`; relative ones relative to ``base`` when given (whose own name may hold
    glob characters). A path that exists is taken as it is, glob characters and all; so is a
    path without glob characters (that it names a file is checked with the jobs:
    :func:`check_jobs`). A glob that matches no file is an error; a glob matches files only,
    never refq's own outputs (``*.refq.safetensors`` and reports), and never the shards of an
    index among the inputs (the index converts them as one checkpoint)."""
    found: dict[Path, Input] = {}
    for pattern in patterns:
        literal = base / pattern if base is not None else Path(pattern)
        if os.path.lexists(literal) or not glob.has_magic(pattern):
            path = normalized(literal)
            found.setdefault(path, Input(path))
            continue
        search = pattern if base is None else os.path.join(glob.escape(str(base)), pattern)
        _refuse_loops(pattern, search)
        folder = glob_folder(pattern)
        folder = normalized(base / folder) if base is not None else folder
        files = [m for m in sorted(glob.glob(search, recursive=True)) if os.path.isfile(m)]
        matches = [m for m in files if not m.endswith(OWN_OUTPUT_SUFFIXES)]
        if not matches:
            own = " but refq's own outputs, which are never inputs" if files else ""
            raise RefqError(f"{pattern}: matches no file{own}")
        for match in matches:
            path = normalized(match)
            found.setdefault(path, Input(path, pattern, folder))
    indexes = [item.path for item in found.values() if is_index(item.path)]
    # The files themselves, which a glob may match under other names (the Hugging Face
    # cache's blobs): an index's shards and the index, which convert as the index.
    parts = {_identity(shard) for index in indexes for shard in checkpoint_files(index)[1:]}
    parts |= {_identity(index) for index in indexes}
    kept, seen = [], set()
    for item in found.values():
        identity = _identity(item.path)
        matched = item.glob is not None and identity is not None
        if matched and ((identity in parts and not is_index(item.path)) or identity in seen):
            continue  # a part of an index, or a file the glob reached by another name
        seen.add(identity)
        kept.append(item)
    return kept


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        status = os.stat(path)
    except OSError:
        return None
    return (status.st_dev, status.st_ino)


def _refuse_loops(pattern: str, search: str) -> None:
    """Refuse a glob whose ``**`` would follow a link round a loop: ``glob`` follows links to
    folders, and one link back to a folder that holds it (``models/again -> ..``) made it
    walk for ever (two such links: 2**40 paths)."""
    parts = Path(search).parts
    if "**" not in parts:
        return
    head = os.path.join(*parts[: parts.index("**")]) if parts.index("**") else "."
    starts = glob.glob(head) if glob.has_magic(head) else [head]
    for start in (s for s in starts if os.path.isdir(s)):
        chains = {start: (os.path.realpath(start),)}  # the real folders walked through
        for folder, subfolders, _ in os.walk(start, followlinks=True):
            chain = chains.pop(folder)
            kept = []
            for name in sorted(subfolders):
                if name.startswith("."):
                    continue  # as glob's ** leaves hidden folders out
                child = os.path.join(folder, name)
                real = os.path.realpath(child)
                inside = real.rstrip(os.sep) + os.sep
                if any(seen == real or seen.startswith(inside) for seen in chain):
                    link = os.path.islink(child)
                    what = f"a link to {os.readlink(child)}" if link else f"the folder {real}"
                    raise RefqError(
                        f"{pattern}: {child} is {what}, which holds it: '**' would follow it "
                        "round for ever; remove the link or give a glob without '**' there"
                    )
                chains[child] = (*chain, real)
                kept.append(name)
            subfolders[:] = kept


def _key(path: Path) -> str:
    return os.path.normpath(os.path.abspath(path))


def check_root(root: Path, named: str) -> Path:
    """``root`` (:func:`normalized`) when it is a folder; RefqError (``named`` names it)
    otherwise."""
    if not os.path.isdir(root):
        what = "is not a folder" if os.path.lexists(root) else "no such folder"
        raise RefqError(
            f"{named}: {what}; give the folder whose tree the artifacts mirror under the "
            "output folder"
        )
    return normalized(root)


def tree_folder(path: Path, top: Path, named: str) -> Path:
    """The folder of ``path`` relative to the folder ``top`` (as written, else with links
    resolved); RefqError (``named`` names ``top``) when ``path`` lies outside it."""
    for resolve in (os.path.abspath, os.path.realpath):
        relative = os.path.relpath(resolve(path.parent), resolve(top))
        if relative != os.pardir and not relative.startswith(os.pardir + os.sep):
            return Path(relative)
    raise RefqError(
        f"{named}: the input {path} is not inside it; give a folder that holds every input"
    )


def out_folder(
    out_dir: Path | None,
    item: Input,
    root: Path | None = None,
    *,
    key: str | None = None,
    root_named: str | None = None,
) -> Path | None:
    """Where an input's artifact goes under ``out_dir``, mirroring the input tree: its folder
    relative to ``root`` when given, else relative to its glob's fixed part
    (:func:`glob_folder`: ``models/a/x.pt`` of ``models/**/*.pt`` goes to ``OUT/a``); an input
    given as a path without ``root`` goes into ``out_dir`` itself. Messages name the root as
    ``root_named`` (default: as the API's argument) and its setting as ``key``."""
    if out_dir is None:
        return None
    if root is not None:
        return out_dir / tree_folder(item.path, root, root_named or argument("root", root))
    if item.glob is not None and item.folder is not None:
        named = (
            f"{item.glob}: the glob's folder {item.folder} (a '..' after a glob character "
            f"leaves it; give {key or _named('root')})"
        )
        return out_dir / tree_folder(item.path, item.folder, named)
    return out_dir


def file_problem(path: Path, what: str) -> str | None:
    """Why ``path`` is no ``what`` file (``checkpoint``, ``spec``, ``calibration``) refq can
    read, with the fix, or None when it is a regular file. Looks without opening it."""
    try:
        status = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        if os.path.islink(path):
            return f"no such {what} file (a link to {os.readlink(path)}, which is missing)"
        return f"no such {what} file{_sibling_hint(path)}"
    except OSError as exc:
        return f"cannot read the {what}: {exc.strerror or exc}"
    if stat.S_ISDIR(status.st_mode):
        if what != "checkpoint":
            return f"is a directory, not a {what} file"
        return f"is a directory; give {_folder_hint(path)}"
    if not stat.S_ISREG(status.st_mode):
        return f"is not a regular file (a FIFO, device or socket); give a {what} file"
    return None


_LISTED = 10_000  # names of a folder read for a hint


def _names_in(folder: Path) -> list[str]:
    try:
        with os.scandir(folder) as entries:
            return [entry.name for _, entry in zip(range(_LISTED), entries, strict=False)]
    except OSError:
        return []


def _sibling_hint(path: Path) -> str:
    hint = did_you_mean(path.name, _names_in(path.parent))
    return hint or "; check the path"


def _folder_hint(folder: Path) -> str:
    """What to give instead of a folder: its sharded checkpoint's index, or a glob."""
    names = _names_in(folder)
    indexes = sorted(n for n in names if is_index(n))
    if len(indexes) == 1:
        return f"its sharded checkpoint's index {folder / indexes[0]}"
    suffix = next(
        (s for s in CHECKPOINT_SUFFIXES if any(n.endswith(s) for n in names)), ".pt"
    )  # the kind of checkpoint the folder holds at its top, .pt when it tells nothing
    pattern = f"'{folder.as_posix().rstrip('/')}/**/*{suffix}'"
    return f"the checkpoints in it, as a glob in quotes: {pattern}"


# Checkpoint names a folder's hint looks for, most telling first.
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors")


def check_jobs(jobs: Sequence[Job], strip_prefix: str | None = None) -> None:
    """What the jobs name, checked before any work so that a problem there stops the run having
    done nothing: every spec read and checked (the spec first, as a conversion reads it), every
    input and calibration a file; no two jobs writing the same artifact."""
    from refq_cli.spec.spec import load_spec

    for spec in dict.fromkeys(job.spec for job in jobs):
        load_spec(spec).stripping(strip_prefix)  # and the prefix given beside it agrees
    check_job_files(jobs)


def check_job_files(jobs: Sequence[Job]) -> None:
    """:func:`check_jobs` but for the specs: every input and calibration a file; no two jobs
    writing the same artifact."""
    for job in jobs:
        problem = file_problem(job.input, "checkpoint")
        if problem:
            raise RefqError(f"{job.input}: {problem}")
    for calibration in dict.fromkeys(job.calibration for job in jobs if job.calibration):
        problem = file_problem(calibration, "calibration")
        if problem:
            raise RefqError(f"{argument('calibration', calibration)}: {problem}")
    check_distinct(jobs)


def check_distinct(jobs: Sequence[Job]) -> None:
    """Two jobs writing the same artifact would lose one of them."""
    seen: dict[str, Job] = {}
    for job in jobs:
        target = _key(job.output)
        if target in seen:
            raise RefqError(
                f"{seen[target].input} and {job.input} would both write {job.output}; give them "
                "different output folders or names (an output folder keeps the inputs' folders "
                "below a glob's fixed part, so give the glob in quotes, or below a root)"
            )
        seen[target] = job


def rejected_job(job: Job) -> Job:
    """Where a conversion that missed its gate goes: each output's name with ``.rejected``
    before its suffix (``m.refq.rejected.safetensors``, ``m.refq.rejected.report.json``)."""

    def aside(path: Path) -> Path:
        return path.with_name(f"{path.stem}.rejected{path.suffix}")

    output = aside(job.output)
    default_report = output_paths(job.input, job.output)[1] == job.report
    report = output_paths(job.input, output)[1] if default_report else aside(job.report)
    return replace(job, output=output, report=report)


def job_outputs(
    job: Job, by_flags: bool, skip_unchanged: bool
) -> tuple[list[tuple[str, Path]], dict[str, Replaceable]]:
    """Every file a job may write and the ``replaceable`` tests of :class:`Outputs`: its
    outputs (refq's own replaceable with ``skip_unchanged``) and, with a gate, where they go
    when it is missed (refq's own earlier rejection always replaceable)."""
    paths = job.outputs(by_flags)
    tests = replaceable_outputs(job, by_flags) if skip_unchanged else {}
    if job.min_sqnr is not None:
        rejected = rejected_job(job)
        aside = replaceable_outputs(rejected, by_flags)
        for flag, path in rejected.outputs(by_flags):
            paths.append((f"{flag} (rejected)", path))
            tests[f"{flag} (rejected)"] = aside[flag]
    return paths, tests


@dataclass(frozen=True)
class Options:
    force: bool = False
    skip_unchanged: bool = False
    device: str = "cpu"
    trust_code: bool = False
    strip_prefix: str | None = None  # besides the spec's (--strip-prefix)
    protected: tuple[tuple[str, Path], ...] = ()  # every input of the run, besides the job's
    by_flags: bool = True  # messages name outputs by their flags (one job of refq convert)
    probe_steps: int | None = None  # besides the spec's report: (--probe-steps)
    probe_sequences: int | None = None  # (--probe-sequences)

    def spec_of(self, spec: Spec) -> Spec:
        """The job's spec as these options change it (--strip-prefix, --probe-*)."""
        return spec.stripping(self.strip_prefix).probing(self.probe_steps, self.probe_sequences)
