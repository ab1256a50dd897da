"""The batch manifest, version 1: conversion jobs, validated like the spec (file:line:column).

```yaml
version: 1
defaults:                     # any job field; each job may override it
  spec: configs/int8-per-channel-symmetric.yaml
  out_dir: out
jobs:
  - input: "checkpoints/*.pt" # a path or a glob (** allowed); one job per file
  - input: models/vad.safetensors
    spec: vad.yaml
    output: out/vad.refq.safetensors
    calibration: calib/vad.pt
    min_sqnr: 30
```

Relative paths are relative to the manifest's folder.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from refq_cli.errors import RefqError
from refq_cli.pipeline.jobs import Job, check_jobs, expand_inputs, output_paths
from refq_cli.spec.yaml_reader import Field, Settings, YamlReader, read_document

MANIFEST_VERSION = 1


class ManifestError(RefqError):
    """A manifest that cannot be read or names jobs that cannot run."""


JOB_FIELDS: dict[str, Field] = {
    "input": Field("str", "Checkpoint path or glob."),
    "spec": Field("str", "The YAML spec to convert with."),
    "output": Field("str", "Artifact path (for an input that names one file)."),
    "out_dir": Field("str", "Folder for the artifacts, named after their inputs."),
    "calibration": Field("str", "Probe inputs for the report."),
    "min_sqnr": Field("number", "Quality gate: the job fails when a weight's SQNR (dB) is below."),
}


def load_manifest(path: str | Path) -> list[Job]:
    """The manifest's jobs, globs expanded, in manifest order; ManifestError names file:line:col."""
    path = Path(path)
    reader = YamlReader(str(path), "manifest", ManifestError)
    root = read_document(path, "manifest", ManifestError)
    top = reader.mapping(root, ["version", "defaults", "jobs"], "the manifest")
    reader.version(top, root, MANIFEST_VERSION)
    defaults = (
        reader.settings(top["defaults"][1], JOB_FIELDS, "defaults") if "defaults" in top else {}
    )
    if "jobs" not in top:
        raise reader.fail(root, "the manifest lists no jobs; add 'jobs:' with at least one input")
    base = path.parent
    jobs: list[Job] = []
    for node in reader.sequence(top["jobs"][1], "jobs"):
        own = reader.settings(node, JOB_FIELDS, "a job")
        if "output" in own and "out_dir" in own:
            raise reader.fail(node, "give output or out_dir, not both")
        # a job's own output or out_dir replaces the default one of the other kind
        inherited = {
            k: v
            for k, v in defaults.items()
            if not (k in ("output", "out_dir") and ({"output", "out_dir"} & set(own)))
        }
        jobs.extend(_expand(reader, node, {**inherited, **own}, base))
    try:
        check_jobs(jobs)
    except RefqError as exc:
        raise ManifestError(f"{path}: {exc}") from None
    return jobs


def _expand(reader: YamlReader, node: yaml.Node, settings: Settings, base: Path) -> list[Job]:
    def where(key: str) -> yaml.Node | None:
        return next((v for k, v in node.value if k.value == key), None)

    def fail(key: str, message: str) -> ManifestError:
        at = where(key) or node
        return reader.fail(at, message)  # type: ignore[return-value]

    for required in ("input", "spec"):
        if required not in settings:
            raise reader.fail(node, f"the job has no {required} (give it here or in defaults)")
    if "output" in settings and "out_dir" in settings:
        raise fail("output", "give output or out_dir, not both (defaults included)")

    def resolve(key: str) -> Path | None:
        return base / settings[key].value if key in settings else None

    pattern = str(base / settings["input"].value)
    try:  # as refq convert takes its inputs: a path that exists is taken as it is
        inputs = expand_inputs([pattern])
    except RefqError:
        raise fail("input", f"input {settings['input'].value!r} matches no file") from None
    if "output" in settings and len(inputs) > 1:
        raise fail("output", f"output names one file but input matches {len(inputs)}; use out_dir")
    jobs = []
    for input_path in inputs:
        artifact, report = output_paths(input_path, resolve("output"), resolve("out_dir"))
        jobs.append(
            Job(
                input=input_path,
                spec=resolve("spec"),  # type: ignore[arg-type]
                output=artifact,
                report=report,
                calibration=resolve("calibration"),
                min_sqnr=settings["min_sqnr"].value if "min_sqnr" in settings else None,
                base=base,
            )
        )
    return jobs
