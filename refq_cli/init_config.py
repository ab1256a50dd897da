"""A commented spec skeleton listing the recurrent modules and weights of a checkpoint."""

from __future__ import annotations

import json

from refq_cli.checkpoint import Checkpoint
from refq_cli.spec import BUILTIN_DEFAULTS, display_path


def skeleton(checkpoint: Checkpoint) -> str:
    """YAML text that loads as a valid spec: the defaults, plus one commented rule per module."""
    lines = [
        "# yaml-language-server: $schema=refq.schema.json",
        f"# refq spec for {checkpoint.path.name} (sha256 {checkpoint.sha256[:12]}): "
        f"{len(checkpoint.modules)} recurrent module(s).",
        "# Rules apply in order; a later match overrides earlier ones field by field.",
        "version: 1",
        "is_decomposed: false",
        "defaults:",
        *(f"  {key}: {value}" for key, value in BUILTIN_DEFAULTS.items()),
        "rules:",
    ]
    for path, module in checkpoint.modules.items():
        shapes = ", ".join(
            f"{name} {'x'.join(map(str, checkpoint.tensors[module.key(name)].shape))}"
            for name in module.weight_names
        )
        lines += [
            f"  # {module.describe()}",
            f"  # weights: {shapes}",
            f"  - match: {_quote(path)}",
            "    # qscheme: per_tensor_affine",
            "    # weights:",
            f"    #   {module.weight_names[-1]}: {{observer: mse}}",
        ]
    if not checkpoint.modules:
        lines[-1] = "rules: []"
    facts = [p for p, m in checkpoint.modules.items() if m.float_type in ("RNN", "RNNCell")]
    lines.append("modules:" if facts else "modules: {}")
    for path in facts:
        lines += [
            f"  {json.dumps(display_path(path))}:",
            "    nonlinearity: tanh  # or relu: weights cannot tell",
        ]
    return "\n".join(lines) + "\n"


def _quote(path: str) -> str:
    """The path as a YAML string and glob that matches exactly it."""
    glob = "".join(f"[{c}]" if c in "*?[" else c for c in display_path(path))
    return json.dumps(glob)
