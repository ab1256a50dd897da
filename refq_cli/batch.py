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

from refq_cli.errors import RefqError

ARTIFACT_SUFFIX = ".refq.safetensors"


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
    trust_pickle: bool = False


def convert_job(
    job: Job, options: Options, progress: Callable[[str, int, int | None], None] | None = None
) -> dict[str, Any]:
    """Convert one job and write its artifact and reports; return the report. Raises RefqError.

    Output paths are checked before any work: distinct from each other and from the job's
    inputs, in existing folders, and new unless ``force``.
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
    from refq_cli.files import check_outputs, write_atomic
    from refq_cli.report import to_markdown

    inputs = {"input": job.input, "spec": job.spec}
    if job.calibration is not None:
        inputs["calibration file"] = job.calibration
    outputs = {"--output": job.output, "--report": job.report, "the Markdown report": job.report_md}
    check_outputs(outputs, inputs, force=options.force)
    conversion = convert(
        job.input,
        job.spec,
        job.output,
        force=options.force,
        device=options.device,
        trust_pickle=options.trust_pickle,
        calibration=job.calibration,
        progress=progress,
    )
    report_text = json.dumps(conversion.report, indent=2, sort_keys=True) + "\n"
    write_atomic(job.report, lambda p: p.write_text(report_text), force=options.force)
    markdown = to_markdown(conversion.report)
    write_atomic(job.report_md, lambda p: p.write_text(markdown), force=options.force)
    report = conversion.report
    report["below_min_sqnr"] = conversion.below(job.min_sqnr) if job.min_sqnr is not None else []
    return report


def is_unchanged(job: Job) -> bool:
    """Whether the job's artifact exists and records this input's sha256, this spec and this
    format version (so converting again would give the same file)."""
    from refq_cli.digest import sha256_of
    from refq_cli.header import FORMAT_VERSION, read_header
    from refq_cli.spec import load_spec

    if not (job.output.is_file() and job.report.is_file() and job.report_md.is_file()):
        return False
    try:
        header = read_header(job.output)
        source = json.loads(header["refq.source"])
        recorded_spec = json.loads(header["refq.spec"])
    except (RefqError, KeyError, json.JSONDecodeError):
        return False
    return (
        header.get("refq.format_version") == str(FORMAT_VERSION)
        and source.get("sha256") == sha256_of(job.input)
        and recorded_spec == json.loads(json.dumps(load_spec(job.spec).to_dict()))
    )


def run_job(job: Job, options: Options) -> JobResult:
    """One job, never raising for refq's own errors: they become a failed result."""
    started = time.perf_counter()
    result = JobResult(str(job.input), str(job.output), "converted")
    try:
        if options.skip_unchanged and job.input.is_file() and is_unchanged(job):
            result.status = "skipped"
        else:
            # with --skip-unchanged, an output that is out of date is replaced
            report = convert_job(
                job, replace(options, force=options.force or options.skip_unchanged)
            )
            result.worst_sqnr_db = report["totals"]["worst_sqnr_db"]
            result.detail = report
            if report["below_min_sqnr"]:
                result.status, result.exit_code = "gate", 1
                result.error = (
                    f"{len(report['below_min_sqnr'])} weight(s) below --min-sqnr "
                    f"{job.min_sqnr:g} dB: " + ", ".join(report["below_min_sqnr"])
                )
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
        "## refq batch conversion",
        "",
        ", ".join(f"{n} {s}" for s, n in counts.items() if n) or "no jobs",
        "",
        "| input | output | status | worst SQNR dB | seconds | error |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        sqnr = "" if r.worst_sqnr_db is None else f"{r.worst_sqnr_db:.2f}"
        error = (r.error or "").replace("|", "\\|")
        lines.append(
            f"| {r.input} | {r.output} | {r.status} | {sqnr} | {r.seconds:.2f} | {error} |"
        )
    return "\n".join(lines) + "\n"
