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

Relative paths are relative to the manifest's folder. With ``out_dir``, a glob's matches keep
their folders under it, relative to the glob's fixed part (``checkpoints/a/m.pt`` of
``checkpoints/**/*.pt`` -> ``out/a/m.refq.safetensors``), or relative to ``root`` when a job
gives one; a path goes into ``out_dir`` itself (under its folder relative to ``root`` with one).
What a job names is checked as the manifest is read: a path that names no file, a folder given
as an input, a missing spec or calibration file are errors at file:line:column.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from refq_cli.errors import RefqError
from refq_cli.pipeline.jobs import (
    Job,
    check_distinct,
    check_root,
    file_problem,
    find_inputs,
    normalized,
    out_folder,
    output_paths,
)
from refq_cli.spec.yaml_reader import Field, Settings, YamlReader, read_document

MANIFEST_VERSION = 1


class ManifestError(RefqError):
    """A manifest that cannot be read or names jobs that cannot run."""


JOB_FIELDS: dict[str, Field] = {
    "input": Field("str", "Checkpoint path or glob."),
    "spec": Field("str", "The YAML spec to convert with."),
    "output": Field("str", "Artifact path (for an input that names one file)."),
    "out_dir": Field("str", "Folder for the artifacts, named after their inputs."),
    "root": Field(
        "str",
        "Folder whose tree the artifacts mirror under out_dir (default: a glob's fixed part).",
    ),
    "calibration": Field(
        "str",
        "Calibration inputs: the report's probe, and what observer output and "
        "rounding gptq fit on.",
    ),
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
        # a job's own output replaces the default out_dir (and root), its out_dir the output
        dropped = {"out_dir", "root"} if "output" in own else {"output"} if "out_dir" in own else ()
        inherited = {k: v for k, v in defaults.items() if k not in dropped}
        jobs.extend(_expand(reader, node, {**inherited, **own}, base))
    try:
        check_distinct(jobs)
    except RefqError as exc:
        raise ManifestError(f"{path}: {exc}") from None
    return jobs


def _expand(reader: YamlReader, node: yaml.Node, settings: Settings, base: Path) -> list[Job]:
    def fail(key: str, message: str) -> ManifestError:
        return ManifestError(f"{settings[key].loc}: {message}")

    for required in ("input", "spec"):
        if required not in settings:
            raise reader.fail(node, f"the job has no {required} (give it here or in defaults)")
    if "output" in settings and "out_dir" in settings:
        raise fail("output", "give output or out_dir, not both (defaults included)")

    def resolve(key: str, what: str | None = None) -> Path | None:
        """The path ``key`` names, relative to the manifest's folder; with ``what``, a file
        of that kind that must exist."""
        if key not in settings:
            return None
        resolved = normalized(base / settings[key].value)
        problem = file_problem(resolved, what) if what else None
        if problem:
            raise fail(key, f"{key} {_quoted(settings[key].value, resolved)}: {problem}")
        return resolved

    spec = resolve("spec", "spec")  # the spec first, as a conversion reads it
    value = settings["input"].value
    try:  # as refq convert takes its inputs: a path that exists is taken as it is
        inputs = find_inputs([value], base)
    except RefqError as exc:  # "PATTERN: matches no file..."
        raise fail("input", f"input {value!r} {str(exc)[len(value) + 2 :]}") from None
    for item in inputs:
        problem = file_problem(item.path, "checkpoint") if item.glob is None else None
        if problem:
            raise fail("input", f"input {_quoted(value, item.path)}: {problem}")
    calibration = resolve("calibration", "calibration")
    out_dir = resolve("out_dir")
    tree_root = resolve("root")
    root_named = f"root {_quoted(settings['root'].value, tree_root)}" if tree_root else None
    if tree_root is not None:
        if out_dir is None:
            raise fail("root", "root says where under out_dir the artifacts go; give out_dir too")
        try:
            tree_root = check_root(tree_root, root_named or "root")
        except RefqError as exc:
            raise fail("root", str(exc)) from None
    if "output" in settings and len(inputs) > 1:
        raise fail("output", f"output names one file but input matches {len(inputs)}; use out_dir")
    jobs = []
    for item in inputs:
        try:
            folder = out_folder(out_dir, item, tree_root, key="root", root_named=root_named)
        except RefqError as exc:
            raise fail("root" if tree_root is not None else "input", str(exc)) from None
        artifact, report = output_paths(item.path, resolve("output"), folder)
        jobs.append(
            Job(
                input=item.path,
                spec=spec,  # type: ignore[arg-type]
                output=artifact,
                report=report,
                calibration=calibration,
                min_sqnr=settings["min_sqnr"].value if "min_sqnr" in settings else None,
                base=base,
            )
        )
    return jobs


def _quoted(value: str, resolved: Path) -> str:
    """A path as the manifest wrote it, and where that is when it differs."""
    return repr(value) if Path(value) == resolved else f"{value!r} ({resolved})"
