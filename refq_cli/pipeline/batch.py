"""Many conversions in one process: jobs, shards, skipping unchanged outputs, worker processes.

A :class:`Job` is one checkpoint converted with one spec to one artifact. ``convert_job`` does
the work of ``refq convert`` for one job and raises on failure; ``run_jobs`` runs a list of jobs,
keeps going past failures (unless told to stop at the first) and reports every job.
"""

from __future__ import annotations

import glob
import heapq
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
from refq_cli.io.inputs import read_at_most
from refq_cli.io.outputs import Outputs, Paths, Replaceable, check_outputs, starts_with
from refq_cli.pipeline.gate import WEIGHT_SQNR, Gate, gate_error, gate_record, named_below

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


_LFS_POINTER = b"version https://git-lfs.github.com/spec/v1\n"
_LFS_POINTER_MAX = 1024  # bytes: Git LFS pointer files are about 130


def input_bytes(path: Path) -> int:
    """The size of an input as sharding weighs it: its size on disk, or for a Git LFS pointer
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
    lowest number). The largest and smallest shard differ by at most the largest input."""
    sizes: dict[str, int] = {}
    weight: dict[str, int] = {}  # bytes an input costs its shard: its size, once per job
    for job in jobs:
        key = job.input_key
        if key not in sizes:
            sizes[key] = weigh(job.input)
        weight[key] = weight.get(key, 0) + sizes[key]
    loads = [(0, 0, s) for s in range(shards)]  # (bytes, inputs, shard): a heap
    shard_of: dict[str, int] = {}
    for key in sorted(weight, key=lambda k: (-weight[k], k)):
        load, count, shard = heapq.heappop(loads)
        shard_of[key] = shard
        heapq.heappush(loads, (load + weight[key], count + 1, shard))
    return [shard_of[job.input_key] for job in jobs]


def select_shard(jobs: Sequence[Job], k: int, n: int) -> list[Job]:
    """The jobs of shard ``k`` of ``n`` (1-based), in their order: see :func:`assign_shards`."""
    return [job for job, shard in zip(jobs, assign_shards(jobs, n), strict=True) if shard == k - 1]


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


STATUSES = ("converted", "skipped", "gate", "failed", "not_run", "listed")


@dataclass
class JobResult:
    """What became of a job: its record in ``--json`` output (:meth:`record`) and summaries.
    The paths are where its files are: the rejected names when it missed its gate."""

    input: str
    spec: str
    output: str
    report_json: str
    report_md: str
    status: str  # one of STATUSES
    error: str | None = None
    seconds: float = 0.0
    worst_sqnr_db: float | None = None
    gate: dict[str, Any] | None = None  # gate_record, when the job has a gate it was judged by
    exit_code: int = 0
    detail: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, job: Job, status: str, **fields: Any) -> JobResult:
        paths = (job.input, job.spec, job.output, job.report, job.report_md)
        return cls(*map(str, paths), status, **fields)

    def record(self) -> dict[str, Any]:
        """The job's record in --json output."""
        out = asdict(self)
        out.pop("detail")
        out.pop("exit_code")
        return out


def totals(results: Sequence[JobResult]) -> dict[str, int]:
    """How many jobs ended in each status, every status named."""
    return {s: sum(r.status == s for r in results) for s in STATUSES}


def totals_line(results: Sequence[JobResult]) -> str:
    """``2 converted, 1 gate`` (statuses with no job left out), for people."""
    counts = totals(results).items()
    return ", ".join(f"{n} {s.replace('_', ' ')}" for s, n in counts if n) or "no jobs"


def run_summary(results: Sequence[JobResult]) -> dict[str, Any]:
    """The ``--json`` output of ``refq convert`` and ``refq batch``, one shape for one job or
    many (``refq_cli/schemas/output.schema.json``)."""
    return {"jobs": [r.record() for r in results], "totals": totals(results)}


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

    Output paths are checked before any work (see :class:`refq_cli.io.outputs.Outputs`): distinct
    from each other, from the job's inputs and ``options.protected``, and new unless ``force``
    (or, with ``skip_unchanged``, refq's own outputs out of date). The artifact and both
    reports are moved into place together once all three are written.
    """
    from refq_cli.io import digest

    if "torch" not in sys.modules:  # hash while torch imports, below; later jobs gain nothing
        digest.start(job.input)
    try:
        return _convert_job(job, options, progress)
    finally:
        digest.discard(job.input)  # a job that failed before reading its input


def _convert_job(
    job: Job, options: Options, progress: Callable[[str, int, int | None], None] | None
) -> dict[str, Any]:
    from refq_cli.pipeline.convert import convert
    from refq_cli.pipeline.report import to_markdown

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
        below: list[dict[str, Any]] = []
        if gate is not None:
            assert gate.below is not None  # judged as the artifact's metadata was made
            below = gate.below
            report["gate"] = gate_record(gate.min_sqnr, WEIGHT_SQNR, below)
        target = rejected if below else job
        markdown = to_markdown(report)
        if gate is not None:
            verdict = gate_error(gate.min_sqnr, below) if below else "passed"
            markdown += f"\nQuality gate (--min-sqnr {gate.min_sqnr:g} dB): {verdict}.\n"
        outputs.write(target.report, (strict_json(report, sort_keys=True) + "\n").encode())
        outputs.write(target.report_md, markdown.encode())
        outputs.commit()
    return report


def missed_gate(report: dict[str, Any]) -> bool:
    """Whether a report (of :func:`convert_job`) records a gate its conversion missed."""
    return report.get("gate") is not None and not report["gate"]["passed"]


def converted_result(job: Job, report: dict[str, Any]) -> JobResult:
    """The result of a job :func:`convert_job` converted into ``report``."""
    placed = rejected_job(job) if missed_gate(report) else job
    result = JobResult.of(
        placed,
        "gate" if missed_gate(report) else "converted",
        seconds=report["totals"]["seconds"],
        worst_sqnr_db=report["totals"]["worst_sqnr_db"],
        gate=report.get("gate"),
        exit_code=int(missed_gate(report)),
        detail=report,
    )
    if missed_gate(report):
        assert job.min_sqnr is not None
        result.error = gate_error(job.min_sqnr, report["gate"]["below"])
    return result


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
    from refq_cli.io.digest import sha256_of
    from refq_cli.io.header import FORMAT_VERSION, read_artifact
    from refq_cli.spec.spec import load_spec

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
    try:
        metadata = None
        if options.skip_unchanged and job.input.is_file():
            metadata = _unchanged_metadata(job)
        if metadata is None:  # with --skip-unchanged, refq's own outputs out of date are replaced
            report = convert_job(job, options)
            result = converted_result(job, report)
        else:
            result = _skipped_result(job, metadata)
    except RefqError as exc:
        result = JobResult.of(job, "failed", error=str(exc), exit_code=exc.exit_code)
    result.seconds = round(time.perf_counter() - started, 3)
    return result


def _skipped_result(job: Job, metadata: dict[str, Any]) -> JobResult:
    """An up-to-date job: skipped, its gate judged again on the SQNRs the artifact records."""
    sqnrs = _recorded_sqnrs(metadata)
    known = [s for _, s in sqnrs if s is not None]
    result = JobResult.of(job, "skipped", worst_sqnr_db=min(known) if known else None)
    if job.min_sqnr is not None:
        below = named_below(sqnrs, job.min_sqnr)
        result.gate = gate_record(job.min_sqnr, WEIGHT_SQNR, below)
        if below:  # not converted again: the artifact in place passed the gate it records
            result.status, result.exit_code = "gate", 1
            result.error = (
                gate_error(job.min_sqnr, below)
                + "; the artifact in place, accepted by an earlier gate, is kept"
            )
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
    reported as "not_run"."""
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
            results[i] = JobResult.of(job, "not_run", error="stopped by --fail-fast")
            report(results[i])
    return [results[i] for i in range(len(jobs))]


def summary_markdown(results: Sequence[JobResult]) -> str:
    """A Markdown table of the jobs, for CI step summaries."""
    lines = [
        SUMMARY_HEADING,
        "",
        totals_line(results),
        "",
        "| input | output | status | worst SQNR dB | seconds | error |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        sqnr = "" if r.worst_sqnr_db is None else f"{r.worst_sqnr_db:.2f}"
        status = r.status.replace("_", " ")
        cells = [r.input, r.output, status, sqnr, f"{r.seconds:.2f}", r.error or ""]
        lines.append("| " + " | ".join(map(markdown_cell, cells)) + " |")
    return "\n".join(lines) + "\n"
