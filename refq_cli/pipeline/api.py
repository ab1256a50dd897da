"""The library's entry points, one per verb, importable from ``refq_cli``: what each CLI command
does, with Python arguments (messages name them: ``force=True``, not ``--force``).

``convert`` a checkpoint into an artifact and its reports; ``load_artifact`` to run it;
``inspect`` its parameters (``diff`` two); ``verify`` it against its checkpoint; ``batch`` the
jobs of a manifest. Each raises a :class:`refq_cli.errors.RefqError` subclass for bad input,
having written nothing.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from refq_cli.deploy import DEFAULT_OPSET
from refq_cli.errors import RefqError, RefqWarning, argument, ignore_torch_noise
from refq_cli.pipeline.batch import JobResult, convert_job, prepare_run, run_jobs
from refq_cli.pipeline.gate import checked_min_sqnr
from refq_cli.pipeline.inspect import describe_artifact, diff_artifacts
from refq_cli.pipeline.jobs import (
    Job,
    Options,
    check_device,
    check_job_files,
    file_argument,
    output_paths,
)
from refq_cli.pipeline.manifest import load_manifest
from refq_cli.pipeline.shards import parse_shard
from refq_cli.spec.spec import Spec, as_spec, check_probe_setting

if TYPE_CHECKING:
    from refq_cli.pipeline.artifact import Artifact, load_artifact
    from refq_cli.pipeline.convert import Conversion
    from refq_cli.pipeline.record import record_calibration

PathLike = str | os.PathLike[str]
Progress = Callable[[str, int, int | None], None]

__all__ = ["Artifact", "Conversion", "batch", "convert", "diff", "inspect", "load_artifact"]
__all__ += ["export", "record_calibration", "verify"]
F = TypeVar("F", bound=Callable[..., Any])
# Importing this module imports no torch, so that a conversion starts hashing its input first
# (refq_cli.io.digest); what needs torch is imported when first used.
_IMPORTED_LATER = {
    "Artifact": "refq_cli.pipeline.artifact",
    "load_artifact": "refq_cli.pipeline.artifact",
    "Conversion": "refq_cli.pipeline.convert",
    "record_calibration": "refq_cli.pipeline.record",
}


def __getattr__(name: str) -> Any:
    if name in _IMPORTED_LATER:
        return getattr(importlib.import_module(_IMPORTED_LATER[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _quiet(entry_point: F) -> F:
    """Without the warnings torch gives about refq's own probes (oneDNN's, for an LSTM with
    projections), as the CLI is; a caller's own warnings filters are left as they were."""

    @functools.wraps(entry_point)
    def run(*args: Any, **kwargs: Any) -> Any:
        with warnings.catch_warnings():
            ignore_torch_noise()
            return entry_point(*args, **kwargs)

    return run  # type: ignore[return-value]


@_quiet
def convert(
    checkpoint: PathLike,
    spec: PathLike | Spec | Mapping[str, Any],
    output: PathLike | None = None,
    *,
    report: PathLike | None = None,
    calibration: PathLike | None = None,
    min_sqnr: float | None = None,
    strip_prefix: str | None = None,
    probe_steps: int | None = None,
    probe_sequences: int | None = None,
    force: bool = False,
    device: str = "cpu",
    trust_code: bool = False,
    progress: Progress | None = None,
) -> Conversion:
    """Convert ``checkpoint`` as ``spec`` (a spec file's path, a :class:`Spec` or a dict of what
    the file would hold) says; write the artifact to ``output`` (default: beside the checkpoint,
    its stem + ``.refq.safetensors``) and the reports to ``report`` (JSON; the Markdown beside
    it with ``.md``; default: beside the artifact). Missing output folders are created.

    With ``min_sqnr``, a conversion with a weight's SQNR (dB) below it still returns, with
    ``passed`` False and its files set aside under ``.rejected`` names (``.output`` says where).
    ``strip_prefix`` removes a wrapper's prefix (``"model."``) from every key, as the spec's
    ``strip_prefix:`` does; ``probe_steps`` and ``probe_sequences`` size the report's random
    probe as the spec's ``report:`` does (``probe_steps=0``: no output error measured). Facts
    the weights cannot tell that neither the checkpoint nor the spec gave (``batch_first``,
    ...) are assumed with PyTorch's defaults, with a
    :class:`~refq_cli.errors.RefqWarning` naming them. The returned conversion holds the
    report (``.report``), the artifact's metadata (``.metadata``) and the runnable modules
    (``.modules[path].reference``).
    """
    _check_switches(force=force, trust_code=trust_code)
    source = _path("checkpoint", checkpoint)
    spec = as_spec(spec).stripping(_prefix(strip_prefix)).probing(probe_steps, probe_sequences)
    artifact, report_json = output_paths(
        source,
        None if output is None else file_argument("output", output),
        None,
        None if report is None else file_argument("report", report),
    )
    job = Job(
        source,
        Path(spec.path),
        artifact,
        report_json,
        None if calibration is None else _path("calibration", calibration),
        checked_min_sqnr(_number("min_sqnr", min_sqnr)),
    )
    check_job_files([job])
    options = Options(force, device=check_device(device), trust_code=trust_code)
    made = _missing_folders(job.output.parent, job.report.parent)
    try:
        conversion = convert_job(job, options, progress, spec=spec)
    except BaseException:
        for folder in made:  # deepest first; only those this call made, and only when empty
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    from refq_cli.pipeline.report import assumed_facts_warning

    warning = assumed_facts_warning(conversion.report)
    if warning:
        warnings.warn(warning, RefqWarning, stacklevel=3)  # the caller's line, past _quiet
    return conversion


def inspect(
    artifact: PathLike, *, module: str = "*", weight: str = "*", channels: bool = False
) -> dict[str, Any]:
    """What ``refq inspect --json`` prints: the artifact's source, producer and totals, and per
    quantized weight its scheme, scale and zero point (their range over channels, and with
    ``channels`` every channel's) and SQNR, in the order the artifact stores them. ``module``
    and ``weight`` are globs. Reads the header and the small parameter tensors only."""
    return describe_artifact(artifact, module=module, weight=weight, channels=channels)


def diff(a: PathLike, b: PathLike, *, module: str = "*", weight: str = "*") -> list[dict[str, Any]]:
    """What ``refq inspect --diff A B --json`` lists under ``differences``: every difference
    between two artifacts, empty when they are identical."""
    return diff_artifacts(a, b, module=module, weight=weight)


@_quiet
def verify(
    artifact: PathLike,
    checkpoint: PathLike,
    *,
    calibration: PathLike | None = None,
    min_sqnr: float | None = None,
    probe_steps: int | None = None,
    probe_sequences: int | None = None,
    trust_code: bool = False,
) -> dict[str, Any]:
    """What ``refq verify --json`` prints: per module, the output error of the artifact's
    reference modules against the float ones of ``checkpoint`` on the probe (``calibration``
    inputs, or the seeded random one); ``source_matches``, whether ``checkpoint`` is the file
    the artifact was converted from; and with ``min_sqnr`` the gate, judged on output SQNR.
    ``probe_steps`` and ``probe_sequences`` size the random probe (by default as the
    conversion's spec did).
    A prefix the conversion stripped (``strip_prefix``) is taken off ``checkpoint`` again."""
    from refq_cli.pipeline.verify import verify as verify_artifact

    _check_switches(trust_code=trust_code)
    return verify_artifact(
        _path("artifact", artifact),
        _path("checkpoint", checkpoint),
        calibration=None if calibration is None else _path("calibration", calibration),
        trust_code=trust_code,
        min_sqnr=checked_min_sqnr(_number("min_sqnr", min_sqnr)),
        probe_steps=probe_steps,
        probe_sequences=probe_sequences,
    )


def export(
    artifact: PathLike,
    out_dir: PathLike,
    *,
    format: str = "onnx",
    module: str = "*",
    opset: int = DEFAULT_OPSET,
    initial_states: bool = True,
    target: str | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """What ``refq export --json`` prints, having written one ONNX model per module of
    ``artifact`` (those matching the glob ``module``) into ``out_dir``: see
    :meth:`Artifact.export_onnx`. ``format`` is ``"onnx"``, the one format there is."""
    from refq_cli.deploy.onnx_files import check_arguments
    from refq_cli.pipeline.artifact import load_artifact

    if format != "onnx":
        raise RefqError(f"{argument('format', format)}: use onnx")
    settings: dict[str, Any] = {
        "module": module,
        "opset": opset,
        "initial_states": initial_states,
        "target": target,
        "force": force,
    }
    folder = check_arguments(out_dir, **settings)  # before the artifact is read
    models = load_artifact(_path("artifact", artifact)).export_onnx(folder, **settings)
    return {
        "artifact": str(artifact),
        "format": format,
        "opset": opset,
        "target": target,
        "models": [
            {
                "module": m.module,
                "path": str(m.path),
                "bytes": m.bytes,
                "inputs": list(m.inputs),
                "outputs": list(m.outputs),
            }
            for m in models
        ],
    }


@_quiet
def batch(
    jobs: PathLike | Sequence[Job],
    *,
    shard: str | None = None,
    workers: int = 1,
    fail_fast: bool = False,
    skip_unchanged: bool = False,
    force: bool = False,
    device: str = "cpu",
    trust_code: bool = False,
    strip_prefix: str | None = None,
    probe_steps: int | None = None,
    probe_sequences: int | None = None,
    on_result: Callable[[JobResult], None] | None = None,
) -> list[JobResult]:
    """Run the jobs of a manifest (its path) or a list of :class:`Job`: every job, each reported
    (``on_result`` hears of each as it ends), never raising for a job that fails: its result
    says so (``status``, ``error``, ``exit_code``). ``shard="K/N"`` runs part K of N. Outputs
    are checked against every input of the run before any work, as ``refq batch`` does.
    ``strip_prefix`` is taken off every job's checkpoint, besides what each spec says;
    ``probe_steps`` and ``probe_sequences`` size every job's probe, over its spec's ``report:``.

    With ``workers`` > 1 the jobs run in spawned processes, which import the caller's main
    module again: call it under ``if __name__ == "__main__":`` in a script."""
    _check_switches(
        fail_fast=fail_fast, skip_unchanged=skip_unchanged, force=force, trust_code=trust_code
    )
    inputs: list[tuple[str, Path]] = []
    if isinstance(jobs, (str, os.PathLike)):
        inputs.append(("manifest", Path(jobs)))
        jobs = load_manifest(jobs)
    elif isinstance(jobs, Mapping) or not all(isinstance(job, Job) for job in jobs):
        raise RefqError("jobs: give a manifest's path or a list of refq_cli.pipeline.jobs.Job")
    if type(workers) is not int or workers < 1:
        raise RefqError(f"{argument('workers', workers)}: give a whole number, at least 1")
    if shard is not None and not isinstance(shard, str):
        raise RefqError(f"{argument('shard', shard)}: write K/N, for example '2/8'")
    part = parse_shard(shard) if shard is not None else None
    check_probe_setting(probe_steps, probe_sequences)
    options = Options(
        force,
        skip_unchanged,
        check_device(device),
        trust_code,
        _prefix(strip_prefix),
        probe_steps=probe_steps,
        probe_sequences=probe_sequences,
    )
    selected, options = prepare_run(list(jobs), options, shard=part, inputs=inputs)
    return run_jobs(selected, options, workers=workers, fail_fast=fail_fast, on_result=on_result)


def _path(name: str, value: Any) -> Path:
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise RefqError(f"{argument(name, value)}: give a file's path")
    return Path(value)


def _check_switches(**switches: Any) -> None:
    """``True`` or ``False`` only: ``trust_code="no"`` must not trust anything."""
    for name, value in switches.items():
        if type(value) is not bool:
            raise RefqError(f"{name}={value!r}: give True or False")


def _number(name: str, value: Any) -> float | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise RefqError(f"{name}={value!r}: give a number")
    return value


def _prefix(strip_prefix: Any) -> str | None:
    if strip_prefix is not None and not isinstance(strip_prefix, str):
        raise RefqError(f"strip_prefix={strip_prefix!r}: give the prefix as text, such as 'model.'")
    return strip_prefix


def _missing_folders(*folders: Path) -> list[Path]:
    """The folders among ``folders`` and their parents that do not exist yet, deepest first."""
    missing: list[Path] = []
    for folder in folders:
        while not folder.exists() and folder not in missing and folder != folder.parent:
            missing.append(folder)
            folder = folder.parent
    return sorted(missing, key=lambda p: len(p.parts), reverse=True)
