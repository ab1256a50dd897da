"""A commented spec skeleton listing the recurrent modules and weights of a checkpoint."""

from __future__ import annotations

import json

from refq_cli.errors import plural
from refq_cli.io.checkpoint import Checkpoint
from refq_cli.kinds import FACTS, display_path, facts_of
from refq_cli.spec.spec import BUILTIN_DEFAULTS


def skeleton(checkpoint: Checkpoint) -> str:
    """YAML text that loads as a valid spec: the defaults, one commented rule per module, and
    every fact weights cannot tell for every module, as the file records it or with PyTorch's
    default, so that editing the skeleton is the way to get them right."""
    lines = [
        "# yaml-language-server: $schema=refq.schema.json",
        f"# refq spec for {checkpoint.path.name} (sha256 {checkpoint.sha256[:12]}): "
        f"{plural(len(checkpoint.modules), 'recurrent module')}.",
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
    with_facts = {p: m for p, m in checkpoint.modules.items() if facts_of(m.float_type)}
    lines.append("modules:" if with_facts else "modules: {}")
    for path, module in with_facts.items():
        lines.append(f"  {json.dumps(display_path(path))}:")
        for fact in facts_of(module.float_type):
            if fact in module.recorded:
                value, note = module.recorded[fact], "as the file records it"
            else:
                value, note = FACTS[fact].default, "PyTorch's default: weights cannot tell"
                note += _hint(fact)
            lines.append(f"    {fact}: {json.dumps(value)}  # {note}")
    return "\n".join(lines) + "\n"


def _hint(fact: str) -> str:
    """What to write instead of a fact's default: its choices, or for batch_first its meaning."""
    check = FACTS[fact].check
    if isinstance(check, tuple):
        return "; " + " or ".join(check)  # "; tanh or relu"
    return "; true for (batch, time, features)" if fact == "batch_first" else ""


def _quote(path: str) -> str:
    """The path as a YAML string and glob that matches exactly it."""
    glob = "".join(f"[{c}]" if c in "*?[" else c for c in display_path(path))
    return json.dumps(glob)
