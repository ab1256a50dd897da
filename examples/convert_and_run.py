"""Convert the bundled example model from Python, check it, and run the quantized model.

The library does what ``refq convert``, ``refq inspect`` and ``refq verify`` do: the artifact
and its reports go to out/examples/, the worst weights are listed, the reference modules are
rerun against the float checkpoint, and the artifact is swapped into the float model.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from model import CHECKPOINT, ExampleModel

import refq_cli

SPEC = CHECKPOINT.with_suffix(".yaml")
OUT = Path(__file__).resolve().parents[1] / "out" / "examples"


def main() -> None:
    conversion = refq_cli.convert(CHECKPOINT, SPEC, OUT / "example.refq.safetensors", force=True)
    totals = conversion.report["totals"]
    print(
        f"wrote {conversion.output} and {conversion.report_md.name}: {totals['weights_quantized']}"
        f" weights, worst SQNR {totals['worst_sqnr_db']:.1f} dB"
    )

    worst = sorted(refq_cli.inspect(conversion.output)["weights"], key=lambda w: w["sqnr_db"])
    for w in worst[:3]:
        print(f"  {w['module']}.{w['weight']}: {w['qscheme']} {w['dtype']}, {w['sqnr_db']:.1f} dB")

    checked = refq_cli.verify(conversion.output, CHECKPOINT, min_sqnr=30)
    for m in checked["modules"]:
        print(f"  {m['path']} output SQNR {m['output_sqnr_db']:.1f} dB on the probe")
    passed = checked["gate"]["passed"]
    print(f"verify: source matches {checked['source_matches']}, gate passed {passed}")

    model = ExampleModel().eval()
    model.load_state_dict(torch.load(CHECKPOINT, weights_only=True))
    quantized = refq_cli.load_artifact(conversion.output).apply_to(ExampleModel().eval())
    x = torch.randn(8, 25, 20, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        same = int((model(x).argmax(1) == quantized(x).argmax(1)).sum())
    print(f"same top class as the float model for {same}/8 inputs")


if __name__ == "__main__":
    main()
