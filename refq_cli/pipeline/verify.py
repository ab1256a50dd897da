"""``refq verify``: rerun an artifact's modules against the float checkpoint they came from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from refq_cli.errors import CheckpointError, RefqError, SpecError, argument
from refq_cli.io.checkpoint import load_checkpoint
from refq_cli.kinds import chosen_on_calibration, display_path, facts_of, module_path
from refq_cli.pipeline.artifact import ArtifactError, check_module_matches, load_artifact
from refq_cli.pipeline.calibration import calls_for, read_calibration_file, without_prefix
from refq_cli.pipeline.convert import check_calibration_names
from refq_cli.pipeline.gate import OUTPUT_SQNR, gate_record, named_below
from refq_cli.pipeline.probe import probe_calls
from refq_cli.spec.spec import ProbeSetting, as_spec, with_dot


def verify(
    artifact_path: str | Path,
    checkpoint_path: str | Path,
    *,
    calibration: str | Path | None = None,
    trust_code: bool = False,
    min_sqnr: float | None = None,
    strip_prefix: str | None = None,
    probe_steps: int | None = None,
    probe_sequences: int | None = None,
) -> dict[str, Any]:
    """Per-module output error of the artifact's reference modules against the float ones;
    with ``min_sqnr``, the gate those output SQNRs are judged by (``gate``, else None).
    ``checkpoint_path`` may be a sharded checkpoint's index; ``strip_prefix`` is as
    :func:`~refq_cli.io.checkpoint.load_checkpoint` takes it, by default the one the artifact's
    spec records (the conversion's). The random probe is sized as the conversion's was
    (its spec's ``report:``) unless ``probe_steps`` or ``probe_sequences`` say otherwise."""
    artifact = load_artifact(artifact_path)
    setting = _probe_setting(
        artifact.metadata["refq.spec"], artifact_path, probe_steps, probe_sequences
    )
    recorded = artifact.metadata["refq.spec"].get("strip_prefix")
    from_artifact = strip_prefix is None and isinstance(recorded, str)
    if from_artifact:
        strip_prefix = recorded
    try:
        checkpoint = load_checkpoint(
            checkpoint_path, trust_code=trust_code, strip_prefix=strip_prefix
        )
    except CheckpointError as exc:
        if from_artifact and "strip_prefix" in str(exc):
            raise CheckpointError(
                f"{exc} (the prefix {artifact_path} was converted with: verify it against the "
                "checkpoint it came from)"
            ) from None
        raise
    prefix = with_dot(strip_prefix) if strip_prefix else None
    inputs = without_prefix(read_calibration_file(calibration), prefix)
    check_calibration_names(calibration, inputs, artifact.modules)
    rows = []
    for name, ref in artifact.modules.items():
        path = module_path(name)
        info = artifact.metadata["refq.modules"][path]
        found = checkpoint.modules.get(path)
        if found is None:
            shown = ", ".join(map(display_path, checkpoint.modules)) or "none"
            raise ArtifactError(
                f"{checkpoint_path}: no recurrent module at {display_path(path)}, which the "
                f"artifact holds; found: {shown}"
            )
        facts = {k: v for k, v in info["config"].items() if k in facts_of(info["float_type"])}
        float_module = found.build(checkpoint.tensors, facts).train(False)  # as converted
        problems = check_module_matches(float_module, info)
        if problems:
            raise ArtifactError(
                f"{checkpoint_path}: {display_path(path)} differs from the artifact: "
                + "; ".join(problems)
            )
        given = inputs.get(display_path(path))
        calls = None if given is None else calls_for(float_module, given, display_path(path))
        rows.append(
            {
                "path": name,
                "float_type": info["float_type"],
                "probe": "random" if calls is None else "calibration",
                # no dropout: repeatable
                **probe_calls(
                    float_module, ref.train(False), calls, setting, name, _calibrated(info)
                ),
            }
        )
    recorded, source = artifact.metadata["refq.source"], checkpoint.source
    gate = None
    if min_sqnr is not None:
        named = ((m["path"], m["output_sqnr_db"]) for m in rows)
        gate = gate_record(min_sqnr, OUTPUT_SQNR, named_below(named, min_sqnr))
    return {
        "artifact": str(artifact_path),
        "checkpoint": str(checkpoint_path),
        # the same file, or the same index and the same shards (each with its sha256)
        "source_matches": recorded.get("sha256") == source["sha256"]
        and recorded.get("shards") == source.get("shards"),
        "modules": rows,
        "gate": gate,
    }


def _calibrated(module: dict[str, Any]) -> bool:
    """Whether a module's entry in ``refq.modules`` records weights whose codes were chosen on
    calibration inputs: the conversion measured it on PyTorch's default kernels."""
    return any(
        w["qscheme"] != "none"
        and chosen_on_calibration(w["observer"], w.get("rounding", "nearest"))
        for w in module["weights"].values()
    )


def _probe_setting(
    recorded: dict[str, Any], artifact_path: str | Path, steps: int | None, sequences: int | None
) -> ProbeSetting:
    """The probe's size: the conversion's (its spec's ``report:``), as the caller changes it."""
    stored, default = recorded.get("report"), ProbeSetting()
    if steps is not None and sequences is not None:
        stored = None  # the caller's size replaces all of it
    try:
        spec = as_spec({"version": 1, **({} if stored is None else {"report": stored})})
    except SpecError as exc:
        raise ArtifactError(
            f"{artifact_path}: its spec's report: is not one this refq reads ({exc}); give the "
            f"probe's size with {argument('probe_steps', default.steps)} and "
            f"{argument('probe_sequences', default.sequences)}"
        ) from None
    setting = spec.probing(steps, sequences).probe
    if setting.off and steps == 0:
        raise RefqError(
            f"{argument('probe_steps', 0)}: verify measures the output error on a probe; give "
            "at least 1 step"
        )
    if setting.off:
        raise RefqError(
            f"{artifact_path} was converted with report: probe_steps: 0, and verify needs a "
            f"probe of at least 1 step; pass {argument('probe_steps', default.steps)}"
        )
    return setting
