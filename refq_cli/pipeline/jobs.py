"""Jobs: one checkpoint converted with one spec to one artifact and its reports; where their
outputs go (and, when a gate is missed, go aside), which of refq's own files an output may
replace, and the check of every output of a run against every input before any work."""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from refq_cli.errors import RefqError
from refq_cli.io.outputs import Replaceable, check_outputs, starts_with

ARTIFACT_SUFFIX = ".refq.safetensors"
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
        """The job's output files, described by their flags (one job of ``refq convert``) or by
        the job's input (one of several)."""
        if flags:
            return [
                ("--output", self.output),
                ("--report", self.report),
                ("the Markdown report", self.report_md),
            ]
        return [
            (f"the output of {self.input}", self.output),
            (f"the report of {self.input}", self.report),
            (f"the Markdown report of {self.input}", self.report_md),
        ]

    def inputs(self) -> list[tuple[str, Path]]:
        found = [("input", self.input), ("spec", self.spec)]
        return found + ([("calibration file", self.calibration)] if self.calibration else [])


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
        outputs.append(("--summary-md", summary))
        replaceable["--summary-md"] = is_summary
    check_outputs(outputs, protected, force=options.force, replaceable=replaceable)
    return replace(options, protected=tuple(protected), by_flags=by_flags)


def is_summary(path: Path) -> bool:
    """Whether ``path`` holds a summary refq wrote, which --summary-md replaces."""
    return starts_with(SUMMARY_HEADING.encode())(path)


def output_paths(
    input_path: Path,
    output: Path | None = None,
    out_dir: Path | None = None,
    report: Path | None = None,
) -> tuple[Path, Path]:
    """(artifact, report JSON) for an input: ``output``, or the input's stem + .refq.safetensors
    in ``out_dir`` (default: beside the input); the report beside the artifact by default."""
    if output is None:
        folder = out_dir if out_dir is not None else input_path.parent
        output = folder / (input_path.stem + ARTIFACT_SUFFIX)
    if report is None:
        report = output.with_name(output.name.removesuffix(".safetensors") + ".report.json")
    elif report.suffix == ".md":
        raise RefqError(
            f"--report {report}: give the JSON path; the Markdown report is written "
            "beside it with .md"
        )
    return output, report


def expand_inputs(patterns: Iterable[str]) -> list[Path]:
    """Paths and globs (sorted, ``**`` allowed) to files; a glob that matches nothing is an error.
    A path that exists is taken as it is, glob characters and all."""
    paths: list[Path] = []
    for pattern in patterns:
        if Path(pattern).exists() or not glob.has_magic(pattern):
            paths.append(Path(pattern))
            continue
        matches = sorted(p for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
        if not matches:
            raise RefqError(f"{pattern}: matches no file")
        paths.extend(Path(p) for p in matches)
    return list(dict.fromkeys(paths))


def check_jobs(jobs: Sequence[Job]) -> None:
    """Two jobs writing the same artifact would lose one of them."""
    seen: dict[str, Job] = {}
    for job in jobs:
        target = os.path.normpath(os.path.abspath(job.output))
        if target in seen:
            raise RefqError(
                f"{seen[target].input} and {job.input} would both write {job.output}; give them "
                "different output folders or names"
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
    protected: tuple[tuple[str, Path], ...] = ()  # every input of the run, besides the job's
    by_flags: bool = True  # messages name outputs by their flags (one job of refq convert)


def make_output_folders(jobs: Iterable[Job]) -> None:
    """Create the folders the jobs' artifacts and reports go to (``--out-dir``, ``out_dir:``)."""
    for job in jobs:
        for folder in dict.fromkeys((job.output.parent, job.report.parent)):
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except FileExistsError:
                raise RefqError(f"{folder}: is not a folder; give a folder for outputs") from None
            except OSError as exc:
                raise RefqError(
                    f"{folder}: cannot create the output folder: {exc.strerror or exc}"
                ) from None
