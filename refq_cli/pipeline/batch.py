"""Running jobs: ``convert_job`` does the work of ``refq convert`` for one job and raises on
failure; ``run_jobs`` runs a list of jobs in this process or in workers, keeps going past
failures (unless told to stop at the first) and reports every job."""

from __future__ import annotations

import itertools
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, replace
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING, Any

from refq_cli.errors import (
    RefqError,
    argument,
    ignore_torch_noise,
    names_flags,
    set_naming_flags,
    strict_json,
)
from refq_cli.io.outputs import Outputs, Paths, Replaceable
from refq_cli.pipeline.gate import WEIGHT_SQNR, Gate, gate_error, gate_record, named_below
from refq_cli.pipeline.jobs import (
    Job,
    Options,
    check_jobs,
    check_run,
    job_outputs,
    rejected_job,
)
from refq_cli.pipeline.shards import select_shard
from refq_cli.pipeline.uptodate import recorded_sqnrs, unchanged_metadata

if TYPE_CHECKING:
    from refq_cli.pipeline.convert import Conversion
    from refq_cli.spec.spec import Spec

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
    warning: str | None = None  # the facts the conversion assumed (report.assumed_facts_warning)
    exit_code: int = 0

    @classmethod
    def of(cls, job: Job, status: str, **fields: Any) -> JobResult:
        paths = (job.input, job.spec, job.output, job.report, job.report_md)
        return cls(*map(str, paths), status, **fields)

    def record(self) -> dict[str, Any]:
        """The job's record in --json output."""
        out = asdict(self)
        out.pop("exit_code")
        return out


def convert_job(
    job: Job,
    options: Options,
    progress: Callable[[str, int, int | None], None] | None = None,
    *,
    spec: Spec | None = None,
) -> Conversion:
    """Convert one job and write its artifact and reports (``spec``, when given, instead of
    reading ``job.spec``). Raises RefqError. Returns the conversion, with the paths its files
    went to: the ``.rejected`` names when it missed its gate.

    Output paths are checked before any work (see :class:`refq_cli.io.outputs.Outputs`): distinct
    from each other, from the job's inputs and ``options.protected``, and new unless ``force``
    (or, with ``skip_unchanged``, refq's own outputs out of date). The artifact and both
    reports are moved into place together once all three are written.
    """
    from refq_cli.io import digest

    if "torch" not in sys.modules:  # hash while torch imports, below; later jobs gain nothing
        digest.start(job.input)
    try:
        return _convert_job(job, options, progress, spec)
    finally:
        digest.discard(job.input)  # a job that failed before reading its input


def _convert_job(
    job: Job,
    options: Options,
    progress: Callable[[str, int, int | None], None] | None,
    spec: Spec | None,
) -> Conversion:
    from refq_cli.pipeline.convert import convert_checkpoint
    from refq_cli.pipeline.report import to_markdown
    from refq_cli.spec.spec import load_spec

    spec = options.spec_of(spec or load_spec(job.spec))
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
        conversion = convert_checkpoint(
            job.input,
            spec,
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
        target = rejected if missed_gate(report) else job
        outputs.write(target.report, (strict_json(report, sort_keys=True) + "\n").encode())
        outputs.write(target.report_md, to_markdown(report).encode())
        outputs.commit()
    return replace(
        conversion, output=target.output, report_json=target.report, report_md=target.report_md
    )


def missed_gate(report: dict[str, Any]) -> bool:
    """Whether a report (of :func:`convert_job`) records a gate its conversion missed."""
    return report.get("gate") is not None and not report["gate"]["passed"]


def converted_result(job: Job, report: dict[str, Any]) -> JobResult:
    """The result of a job :func:`convert_job` converted into ``report``."""
    from refq_cli.pipeline.report import assumed_facts_warning

    placed = rejected_job(job) if missed_gate(report) else job
    result = JobResult.of(
        placed,
        "gate" if missed_gate(report) else "converted",
        seconds=report["totals"]["seconds"],
        worst_sqnr_db=report["totals"]["worst_sqnr_db"],
        gate=report.get("gate"),
        warning=assumed_facts_warning(report),
        exit_code=int(missed_gate(report)),
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


def run_job(job: Job, options: Options) -> JobResult:
    """One job, never raising for its errors (refq's own, or any other Exception): they
    become a failed result."""
    started = time.perf_counter()
    try:
        metadata = None
        if options.skip_unchanged and job.input.is_file():
            metadata = unchanged_metadata(job, options)
        if metadata is None:  # with --skip-unchanged, refq's own outputs out of date are replaced
            result = converted_result(job, convert_job(job, options).report)
        else:
            result = _skipped_result(job, metadata)
    except RefqError as exc:
        result = JobResult.of(job, "failed", error=str(exc), exit_code=exc.exit_code)
    except Exception as exc:  # a bug or a resource refq did not foresee: this job fails alone
        error = f"internal error: {type(exc).__name__}: {exc}"
        result = JobResult.of(job, "failed", error=error, exit_code=1)
    result.seconds = round(time.perf_counter() - started, 3)
    return result


def _skipped_result(job: Job, metadata: dict[str, Any]) -> JobResult:
    """An up-to-date job: skipped, its gate judged again on the SQNRs the artifact records."""
    sqnrs = recorded_sqnrs(metadata)
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


def _init_worker(threads: int, flags: bool) -> None:
    import torch

    torch.set_num_threads(threads)
    ignore_torch_noise()  # as the parent process does
    set_naming_flags(flags)  # messages name the CLI's flags when the parent's do


def shard_jobs(
    jobs: Sequence[Job], shard: tuple[int, int] | None, strip_prefix: str | None = None
) -> list[Job]:
    """The jobs of shard ``(k, n)`` (all without one), once no two jobs write one artifact:
    what ``--list`` shows and :func:`prepare_run` prepares."""
    check_jobs(jobs, strip_prefix)
    return select_shard(jobs, *shard) if shard is not None else list(jobs)


def prepare_run(
    jobs: Sequence[Job],
    options: Options,
    *,
    shard: tuple[int, int] | None = None,
    summary: Path | None = None,
    inputs: Sequence[tuple[str, Path]] = (),
) -> tuple[list[Job], Options]:
    """Everything a run does before its work, in this order: no two jobs write one artifact;
    the jobs of shard ``(k, n)``; every output of those jobs (and the
    summary) checked against each other and against every input of the run: ``inputs`` (the
    manifest) and those of every job, other shards' too. Returns the jobs to run and the
    options for them, which carry the run's inputs so that each job protects them all."""
    selected = shard_jobs(jobs, shard, options.strip_prefix)
    chosen = {id(job) for job in selected}
    others = [pair for job in jobs if id(job) not in chosen for pair in job.inputs()]
    return selected, check_run(selected, options, summary=summary, inputs=[*inputs, *others])


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
            workers,
            mp_context=get_context("spawn"),
            initializer=_init_worker,
            initargs=(threads, names_flags()),
        ) as pool:
            waiting = iter(enumerate(jobs))
            running: dict[Future[JobResult], int] = {}
            while True:  # at most one job per worker handed out: --fail-fast stops the rest
                for i, job in itertools.islice(waiting, 0 if stopped else workers - len(running)):
                    running[pool.submit(run_job, job, options)] = i
                if not running:
                    break
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    i = running.pop(future)
                    results[i] = future.result()
                    report(results[i])
                    stopped = stopped or (fail_fast and results[i].exit_code != 0)
    for i, job in enumerate(jobs):
        if i not in results:
            results[i] = JobResult.of(job, "not_run", error=f"stopped by {argument('fail_fast')}")
            report(results[i])
    return [results[i] for i in range(len(jobs))]
