"""Many conversions in one process: jobs, shards, skipping unchanged outputs, worker processes.

A :class:`Job` is one checkpoint converted with one spec to one artifact. ``convert_job`` does
the work of ``refq convert`` for one job and raises on failure; ``run_jobs`` runs a list of jobs,
keeps going past failures (unless told to stop at the first) and reports every job.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from refq_cli.errors import RefqError, markdown_cell, strict_json
from refq_cli.files import Outputs, Paths, Replaceable, check_outputs, starts_with
from refq_cli.gate import Gate, gate_error, weights_below

ARTIFACT_SUFFIX = ".refq.safetensors"
REPORT_MD_HEADING = "# refq conversion report"  # what report.to_markdown starts with
SUMMARY_HEADING = "## refq batch conversion"
_REPORT_LIMIT = 1 << 26  # bytes of a JSON report read to tell whether refq wrote it


@dataclass(frozen=True)
class Job:
    """One conversion. ``key`` (input and output as written, or relative to the manifest's
    folder) is what sharding hashes, so it depends neither on the machine nor on job order."""

    input: Path
    spec: Path
    output: Path
    report: Path
    calibration: Path | None = None
    min_sqnr: float | None = None
    base: Path | None = None  # the manifest's folder: keys are relative to it

    @property
    def key(self) -> str:
        def shown(p: Path) -> str:
            return Path(os.path.relpath(p, self.base)).as_posix() if self.base else p.as_posix()

        return f"{shown(self.input)}\n{shown(self.output)}"

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
    from refq_cli.header import read_header

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
        target = os.path.normpath(job.output)
        if target in seen:
            raise RefqError(
                f"{seen[target].input} and {job.input} would both write {job.output}; give them "
                "different output folders or names"
            )
        seen[target] = job


# --- sharding ---------------------------------------------------------------------------------


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` with 1 <= K <= N: shard K of N."""
    try:
        k, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise RefqError(f"--shard {text}: write K/N, for example 2/8") from None
    if not 1 <= k <= n:
        raise RefqError(f"--shard {text}: K must be between 1 and N")
    return k, n


def shard_index(key: str, shards: int) -> int:
    """Which of ``shards`` shards (0-based) a job key falls in: a hash, the same everywhere."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % shards


def select_shard(jobs: Sequence[Job], k: int, n: int) -> list[Job]:
    return [job for job in jobs if shard_index(job.key, n) == k - 1]


# --- quality gates ----------------------------------------------------------------------------


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


def _recorded_gate(metadata: dict[str, Any]) -> dict[str, Any] | None:
    """The artifact's ``refq.gate`` (checked), None without one; ArtifactError if malformed."""
    from refq_cli.errors import ArtifactError

    text = metadata.get("refq.gate")
    if text is None:
        return None
    try:
        gate = json.loads(text)
    except (ValueError, RecursionError):
        gate = None
    if not (
        isinstance(gate, dict)
        and type(gate.get("passed")) is bool
        and type(gate.get("min_sqnr")) in (int, float)
    ):
        raise ArtifactError("corrupt artifact: metadata refq.gate is malformed")
    return gate


def _recorded_sqnrs(metadata: dict[str, Any]) -> list[tuple[str, float | None]]:
    """(module.weight, SQNR dB) of every weight, from checked artifact metadata."""
    return [
        (f"{module}.{name}", w.get("sqnr_db"))
        for module, info in metadata["refq.modules"].items()
        for name, w in info["weights"].items()
    ]


# --- running ----------------------------------------------------------------------------------


@dataclass
class JobResult:
    input: str
    output: str
    status: str  # converted | skipped | failed | gate | not run
    error: str | None = None
    seconds: float = 0.0
    worst_sqnr_db: float | None = None
    exit_code: int = 0
    detail: dict[str, Any] = field(default_factory=dict, repr=False)

    def record(self) -> dict[str, Any]:
        """The job's line in --json summaries."""
        out = asdict(self)
        out.pop("detail")
        out.pop("exit_code")
        return out


@dataclass(frozen=True)
class Options:
    force: bool = False
    skip_unchanged: bool = False
    device: str = "cpu"
    trust_code: bool = False
    protected: tuple[tuple[str, Path], ...] = ()  # every input of the run, besides the job's
    by_flags: bool = True  # messages name outputs by their flags (one job of refq convert)


def convert_job(
    job: Job, options: Options, progress: Callable[[str, int, int | None], None] | None = None
) -> dict[str, Any]:
    """Convert one job and write its artifact and reports; return the report. Raises RefqError.

    Output paths are checked before any work (see :class:`refq_cli.files.Outputs`): distinct
    from each other, from the job's inputs and ``options.protected``, and new unless ``force``
    (or, with ``skip_unchanged``, refq's own outputs out of date). The artifact and both
    reports are moved into place together once all three are written.
    """
    from refq_cli import digest

    if "torch" not in sys.modules:  # hash while torch imports, below; later jobs gain nothing
        digest.start(job.input)
    try:
        return _convert_job(job, options, progress)
    finally:
        digest.discard(job.input)  # a job that failed before reading its input


def _convert_job(
    job: Job, options: Options, progress: Callable[[str, int, int | None], None] | None
) -> dict[str, Any]:
    from refq_cli.convert import convert
    from refq_cli.report import to_markdown

    paths, tests = job_outputs(job, options.by_flags, options.skip_unchanged)
    gate = Gate(float(job.min_sqnr)) if job.min_sqnr is not None else None
    rejected = rejected_job(job)
    with _GatedOutputs(
        paths,
        [*job.inputs(), *options.protected],
        force=options.force,
        replaceable=tests,
        gate=gate,
        artifact=(job.output, rejected.output),
    ) as outputs:
        conversion = convert(
            job.input,
            job.spec,
            job.output,
            force=options.force,
            device=options.device,
            trust_code=options.trust_code,
            calibration=job.calibration,
            progress=progress,
            outputs=outputs,
            gate=gate,
        )
        report = conversion.report
        below: list[str] = []
        if gate is not None:
            assert gate.below is not None  # judged as the artifact's metadata was made
            below = gate.below
            report["gate"] = {"min_sqnr": gate.min_sqnr, "passed": not below, "below": below}
        target = rejected if below else job
        markdown = to_markdown(report)
        if gate is not None:
            verdict = gate_error(gate.min_sqnr, below) if below else "passed"
            markdown += f"\nQuality gate (--min-sqnr {gate.min_sqnr:g} dB): {verdict}.\n"
        outputs.write(target.report, (strict_json(report, sort_keys=True) + "\n").encode())
        outputs.write(target.report_md, markdown.encode())
        outputs.commit()
    report["below_min_sqnr"] = below
    return report


class _GatedOutputs(Outputs):
    """A job's outputs, where an artifact that missed its gate (judged before it is staged,
    as its metadata is made) is staged under its rejected name instead of its own."""

    def __init__(
        self,
        outputs: Paths,
        inputs: Paths,
        *,
        force: bool,
        replaceable: dict[str, Replaceable],
        gate: Gate | None,
        artifact: tuple[Path, Path],
    ) -> None:
        super().__init__(outputs, inputs, force=force, replaceable=replaceable)
        self.gate, self.artifact = gate, artifact

    def write(self, path: Path, content: Any) -> None:
        accepted, rejected = self.artifact
        if self.gate is not None and self.gate.below and Path(path) == accepted:
            path = rejected
        super().write(path, content)


def is_unchanged(job: Job) -> bool:
    """Whether the job's artifact exists, records this input's sha256, this spec and this
    format version (so converting again would give the same tensors), and did not miss the
    gate it was converted with. Whether it passes the job's gate is :func:`run_job`'s to say."""
    return _unchanged_metadata(job) is not None


def _unchanged_metadata(job: Job) -> dict[str, Any] | None:
    """The checked metadata of the job's artifact when :func:`is_unchanged`, else None."""
    from refq_cli.digest import sha256_of
    from refq_cli.header import FORMAT_VERSION, read_artifact
    from refq_cli.spec import load_spec

    if not (job.output.is_file() and job.report.is_file() and job.report_md.is_file()):
        return None
    try:
        _, metadata = read_artifact(job.output)
        gate = _recorded_gate(metadata)
    except RefqError:  # not an artifact this refq reads: converting again replaces it
        return None
    unchanged = (
        metadata["refq.format_version"] == str(FORMAT_VERSION)
        and (gate is None or gate["passed"])  # a rejected one put in place is never up to date
        and metadata["refq.source"].get("sha256") == sha256_of(job.input)
        and metadata["refq.spec"] == json.loads(json.dumps(load_spec(job.spec).to_dict()))
    )
    return metadata if unchanged else None


def run_job(job: Job, options: Options) -> JobResult:
    """One job, never raising for refq's own errors: they become a failed result."""
    started = time.perf_counter()
    result = JobResult(str(job.input), str(job.output), "converted")
    try:
        metadata = None
        if options.skip_unchanged and job.input.is_file():
            metadata = _unchanged_metadata(job)
        if metadata is not None:  # the gate is judged again, on the SQNRs the artifact records
            sqnrs = _recorded_sqnrs(metadata)
            known = [s for _, s in sqnrs if s is not None]
            result.status, result.worst_sqnr_db = "skipped", min(known) if known else None
            below = weights_below(sqnrs, job.min_sqnr) if job.min_sqnr is not None else []
        else:  # with --skip-unchanged, refq's own outputs that are out of date are replaced
            report = convert_job(job, options)
            result.worst_sqnr_db = report["totals"]["worst_sqnr_db"]
            result.detail = report
            below = report["below_min_sqnr"]
            if below:
                result.output = str(rejected_job(job).output)
        if below:
            assert job.min_sqnr is not None
            result.status, result.exit_code = "gate", 1
            result.error = gate_error(job.min_sqnr, below)
            if metadata is not None:  # not converted again: it passed the gate it records
                result.error += "; the artifact in place, accepted by an earlier gate, is kept"
    except RefqError as exc:
        result.status, result.error, result.exit_code = "failed", str(exc), exc.exit_code
    result.seconds = round(time.perf_counter() - started, 3)
    return result


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def run_jobs(
    jobs: Sequence[Job],
    options: Options,
    *,
    workers: int = 1,
    fail_fast: bool = False,
    on_result: Callable[[JobResult], None] | None = None,
) -> list[JobResult]:
    """Run every job (in ``workers`` processes, each converting whole files) and report each,
    in the order of ``jobs``. With ``fail_fast``, jobs not started after a failure are
    reported as "not run"."""
    results: dict[int, JobResult] = {}
    report = on_result or (lambda _: None)
    stopped = False
    if workers <= 1:
        for i, job in enumerate(jobs):
            if stopped:
                break
            results[i] = run_job(job, options)
            report(results[i])
            stopped = fail_fast and results[i].exit_code != 0
    else:
        threads = max(1, (os.cpu_count() or 1) // workers)
        with ProcessPoolExecutor(
            workers, mp_context=get_context("spawn"), initializer=_init_worker, initargs=(threads,)
        ) as pool:
            futures = {pool.submit(run_job, job, options): i for i, job in enumerate(jobs)}
            for future in as_completed(futures):
                i = futures[future]
                results[i] = future.result()
                report(results[i])
                if fail_fast and results[i].exit_code != 0 and not stopped:
                    stopped = True
                    for other in futures:
                        other.cancel()
    for i, job in enumerate(jobs):
        if i not in results:
            results[i] = JobResult(
                str(job.input), str(job.output), "not run", error="stopped by --fail-fast"
            )
            report(results[i])
    return [results[i] for i in range(len(jobs))]


def summary_markdown(results: Sequence[JobResult]) -> str:
    """A Markdown table of the jobs, for CI step summaries."""
    counts = {
        s: sum(r.status == s for r in results)
        for s in ("converted", "skipped", "gate", "failed", "not run")
    }
    lines = [
        SUMMARY_HEADING,
        "",
        ", ".join(f"{n} {s}" for s, n in counts.items() if n) or "no jobs",
        "",
        "| input | output | status | worst SQNR dB | seconds | error |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        sqnr = "" if r.worst_sqnr_db is None else f"{r.worst_sqnr_db:.2f}"
        cells = [r.input, r.output, r.status, sqnr, f"{r.seconds:.2f}", r.error or ""]
        lines.append("| " + " | ".join(map(markdown_cell, cells)) + " |")
    return "\n".join(lines) + "\n"
