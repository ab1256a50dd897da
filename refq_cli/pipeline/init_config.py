"""A commented spec skeleton listing the recurrent modules and weights of a checkpoint."""

from __future__ import annotations

import json

from refq_cli.errors import plural
from refq_cli.io.checkpoint import Checkpoint
from refq_cli.kinds import FACTS, display_path
from refq_cli.spec.spec import BUILTIN_DEFAULTS


def skeleton(checkpoint: Checkpoint) -> str:
    """YAML text that loads as a valid spec: the defaults, one commented rule per module, and
    every fact weights cannot tell for every module, as the file records it, or else commented
    out with PyTorch's default (so that converting with it unedited warns of each, as converting
    without it does)."""
    checkpoint.check_has_modules()  # a skeleton of nothing would not convert
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
    facts = {p: m.asked_facts for p, m in checkpoint.modules.items()}
    recorded = [p for p, m in checkpoint.modules.items() if set(facts[p]) & set(m.recorded)]
    lines.append("modules:" if any(facts.values()) else "modules: {}")
    if any(facts.values()):
        lines.append(
            "  # Facts weights cannot tell, commented out where the file does not record them: "
            "until one is set, refq assumes PyTorch's default and warns."
        )
    for path, module in checkpoint.modules.items():
        if not facts[path]:
            continue
        lines.append(f"  {'' if path in recorded else '# '}{json.dumps(display_path(path))}:")
        for fact in facts[path]:
            if fact in module.recorded:
                value, note, mark = module.recorded[fact], "as the file records it", ""
            else:
                value, note, mark = FACTS[fact].default, "PyTorch's default" + _hint(fact), "# "
            lines.append(f"    {mark}{fact}: {json.dumps(value)}  # {note}")
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
