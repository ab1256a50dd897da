"""Whether a job's outputs are up to date (``--skip-unchanged``): its artifact records this
input's sha256 (a sharded checkpoint's: its index's and each shard's), this spec and this
format version (and, when its codes depend on one, this calibration file's sha256), and did not
miss the gate it was converted with. Reads headers only: no torch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from refq_cli.errors import RefqError
from refq_cli.kinds import tensor_key
from refq_cli.pipeline.jobs import Job, Options


def recorded_gate(metadata: dict[str, Any]) -> dict[str, Any] | None:
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


def recorded_sqnrs(metadata: dict[str, Any]) -> list[tuple[str, float | None]]:
    """(module.weight, SQNR dB) of every weight, from checked artifact metadata."""
    return [
        (tensor_key(module, name), w.get("sqnr_db"))
        for module, info in metadata["refq.modules"].items()
        for name, w in info["weights"].items()
    ]


def source_unchanged(recorded: dict[str, Any], path: Path) -> bool:
    """Whether the checkpoint at ``path`` is the one an artifact's ``refq.source`` records:
    the same sha256, and for a sharded checkpoint's index the same shards, in the same order,
    each with the same sha256. A file that cannot be read is not."""
    from refq_cli.io.digest import sha256_of
    from refq_cli.io.sharded import is_index, read_checked

    try:
        if not is_index(path):
            return "shards" not in recorded and recorded.get("sha256") == sha256_of(path)
        index = read_checked(path)
        shards = recorded.get("shards")
        if (
            recorded.get("sha256") != index.sha256
            or not isinstance(shards, list)
            or [s.get("name") for s in shards] != index.shards
        ):
            return False
        return all(s.get("sha256") == sha256_of(index.shard_path(s["name"])) for s in shards)
    except (RefqError, OSError):  # converting again says what is wrong with it
        return False


def is_unchanged(job: Job, options: Options | None = None) -> bool:
    """Whether the job's artifact exists, records this input's sha256, this spec (as the
    options change it) and this format version, and the calibration file's sha256 where its
    codes depend on one (so converting again would give the same tensors), and did not miss
    the gate it was converted with. Whether it passes the job's gate is :func:`run_job`'s to say."""
    return unchanged_metadata(job, options or Options()) is not None


def unchanged_metadata(job: Job, options: Options) -> dict[str, Any] | None:
    """The checked metadata of the job's artifact when :func:`is_unchanged`, else None."""
    from refq_cli.io.header import FORMAT_VERSION, read_artifact
    from refq_cli.spec.spec import load_spec

    if not (job.output.is_file() and job.report.is_file() and job.report_md.is_file()):
        return None
    try:
        _, metadata = read_artifact(job.output)
        gate = recorded_gate(metadata)
    except RefqError:  # not an artifact this refq reads: converting again replaces it
        return None
    unchanged = (
        metadata["refq.format_version"] == str(FORMAT_VERSION)
        and (gate is None or gate["passed"])  # a rejected one put in place is never up to date
        and source_unchanged(metadata["refq.source"], job.input)
        and metadata["refq.spec"]
        == json.loads(json.dumps(options.spec_of(load_spec(job.spec)).to_dict()))
        and calibration_unchanged(metadata.get("refq.calibration"), job.calibration)
    )
    return metadata if unchanged else None


def calibration_unchanged(recorded: str | None, path: Path | None) -> bool:
    """Whether the calibration file an artifact's codes were chosen on (``refq.calibration``,
    when they depend on one) is the job's: the same sha256. No record: the codes depend on
    none, and the probe inputs only change the report."""
    from refq_cli.io.digest import sha256_of

    if recorded is None:
        return True
    try:
        sha256 = json.loads(recorded).get("sha256")
        return path is not None and sha256 == sha256_of(path)
    except (ValueError, AttributeError, RecursionError, RefqError, OSError):
        return False
