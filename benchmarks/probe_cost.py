"""What the report's probe costs on the 576 MB model: as refq runs it, and as it ran before.

The probe runs the float and the reference module on the seeded probe input (16 steps of 4
sequences) for every recurrent module of ``big_checkpoint.build`` (4-layer LSTM(1024, 2048),
GRU(2048, 1024), LSTMCell(1024, 1024)), two ways, in the same process:

* refq's: the float and the reference module at once, each on one thread of PyTorch's native
  recurrent kernels (``refq_cli.pipeline.probe.measured_outputs``);
* one module after the other on all threads and PyTorch's default kernels (oneDNN for an LSTM):
  how refq probed before, and how it still probes a module with calibrated weights.

Each THP setting runs in its own process, because PyTorch reads ``THP_MEM_ALLOC_ENABLE`` once.
The first round also pays the reference modules' one-time fake-quantization; the best of the
``--repeat`` rounds after it counts.

    python benchmarks/probe_cost.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path


def probe_seconds(repeat: int) -> dict[str, float]:
    """Best seconds of probing every recurrent module, each way, in this process."""

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from big_checkpoint import build

    from refq_cli.pipeline.probe import probe_calls
    from refq_cli.quant.observers import observe
    from refq_cli.reference.registry import converter_for
    from refq_cli.spec.spec import QParamSpec

    int8 = QParamSpec("qint8", "per_channel_symmetric", 0, "minmax", 99.99)

    model = build(4).eval()
    pairs = []
    for module in (model.encoder, model.context, model.decoder):
        qparams: dict = {"is_decomposed": False}
        for name, w in module.named_parameters():
            if name.startswith("weight"):
                qparams[name] = observe(w, int8, name)
        pairs.append((module, converter_for(module)(module, qparams)))
    times: dict[str, list[float]] = {"refq": [], "before": []}
    for _ in range(repeat + 1):  # interleaved
        for way, sequential in (("refq", False), ("before", True)):
            start = time.perf_counter()
            for float_mod, ref in pairs:
                probe_calls(float_mod, ref, None, calibrated=sequential)
            times[way].append(time.perf_counter() - start)
    return {way: min(t[1:]) for way, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--here", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.here:
        best = probe_seconds(args.repeat)
        print(best["refq"], best["before"])
        return
    for setting in ("0", "1"):
        env = {**os.environ, "THP_MEM_ALLOC_ENABLE": setting}
        out = subprocess.run(
            [sys.executable, __file__, "--here", "--repeat", str(args.repeat)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        refq, before = float(out[0]), float(out[1])
        print(
            f"THP_MEM_ALLOC_ENABLE={setting}: refq's probe {refq:.2f} s; one module after the "
            f"other on the default kernels {before:.2f} s ({refq / before:.2f}x)"
        )


if __name__ == "__main__":
    main()
