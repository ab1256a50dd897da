"""What the report's probe costs on the 576 MB model, with and without huge pages.

The probe runs the float and the reference module on the seeded probe input (16 steps of 4
sequences) for every recurrent module of ``big_checkpoint.build`` (4-layer LSTM(1024, 2048),
GRU(2048, 1024), LSTMCell(1024, 1024)). Each setting runs in its own process, because PyTorch
reads ``THP_MEM_ALLOC_ENABLE`` once. The first probe also pays the reference modules' one-time
fake-quantization and oneDNN's set-up; the best of the ``--repeat`` probes after it is the
probe's own cost. One call of a one-layer LSTM(2048, 2048) for 1 and for 16 steps shows how much
of it is per call (oneDNN copies the weights into its layout on every call).

    python benchmarks/probe_cost.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path


def probe_seconds(repeat: int) -> tuple[float, float]:
    """(first, best) seconds of probing every recurrent module, in this process."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from big_checkpoint import build

    from refq_cli.pipeline.probe import probe_calls
    from refq_cli.reference.registry import converter_for

    model = build(4).eval()
    pairs = []
    for module in (model.encoder, model.context, model.decoder):
        qparams: dict = {"is_decomposed": False}
        for name, w in module.named_parameters():
            if name.startswith("weight"):
                scale = w.detach().abs().amax(dim=1).clamp(min=1e-12) / 127.5
                qparams[name] = {
                    "qscheme": "per_channel_affine",
                    "dtype": "qint8",
                    "scale": scale,
                    "zero_point": torch.zeros_like(scale),
                    "axis": 0,
                }
        pairs.append((module, converter_for(module)(module, qparams)))
    times = []
    for _ in range(repeat + 1):
        start = time.perf_counter()
        for float_mod, ref in pairs:
            probe_calls(float_mod, ref, None)
        times.append(time.perf_counter() - start)
    return times[0], min(times[1:])


def lstm_call_ms(steps: int, repeat: int) -> float:
    """Best milliseconds of one call of a one-layer LSTM(2048, 2048) on 4 sequences: how much
    of a probe's cost is per call rather than per step."""
    import torch

    lstm = torch.nn.LSTM(2048, 2048).eval()
    x = torch.randn(steps, 4, 2048)
    times = []
    with torch.no_grad():
        for _ in range(repeat + 1):
            start = time.perf_counter()
            lstm(x)
            times.append(time.perf_counter() - start)
    return min(times[1:]) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--here", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.here:
        first, best = probe_seconds(args.repeat)
        one, sixteen = (lstm_call_ms(steps, args.repeat) for steps in (1, 16))
        print(f"{first:.3f} {best:.3f} {one:.1f} {sixteen:.1f}")
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
        print(
            f"THP_MEM_ALLOC_ENABLE={setting}: first probe {float(out[0]):.2f} s, "
            f"then {float(out[1]):.2f} s (float and reference forwards, every module); "
            f"one LSTM(2048, 2048) call: {out[2]} ms for 1 step, {out[3]} ms for 16"
        )


if __name__ == "__main__":
    main()
