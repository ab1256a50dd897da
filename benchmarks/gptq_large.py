"""Calibrated conversion of a large model: a 4-layer LSTM(1024, 2048), int4 per channel.

    python benchmarks/gptq_large.py [CONFIG ...]

CONFIG: observer+rounding pairs, by default ``minmax+gptq mse+nearest output+gptq``. Each is
converted in its own process (so its peak RSS is its own), with calibration inputs recorded
by ``refq_cli.record_calibration`` from 16 random sequences of 256 steps (4,096 rows, the
rows every layer's Hessians come from). Prints wall seconds, peak RSS and the ratio to
``mse+nearest`` (the issue's targets: GPTQ under 60 s; calibrated at most 3x mse).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import json, resource, sys, time
import refq_cli
observer, rounding, folder = sys.argv[1], sys.argv[2], sys.argv[3]
spec = {"version": 1, "defaults": {"dtype": "int4", "qscheme": "per_channel_symmetric",
        "observer": observer, "rounding": rounding}}
start = time.perf_counter()
refq_cli.convert(f"{folder}/lstm.pt", spec, f"{folder}/out.refq.safetensors", force=True,
                 calibration=f"{folder}/calib.safetensors")
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
print(json.dumps({"seconds": seconds, "peak_gb": peak}))
"""


def prepare(folder: Path) -> None:
    import torch
    from torch import nn

    import refq_cli

    torch.manual_seed(0)
    model = nn.Module()
    model.lstm = nn.LSTM(1024, 2048, num_layers=4).eval()
    torch.save(model.state_dict(), folder / "lstm.pt")
    with refq_cli.record_calibration(model, folder / "calib.safetensors"), torch.no_grad():
        for _ in range(4):
            model.lstm(torch.randn(256, 4, 1024))


def main(configs: list[str]) -> None:
    configs = configs or ["minmax+gptq", "mse+nearest", "output+gptq"]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        prepare(folder)
        print(f"model and calibration written in {time.perf_counter() - start:.1f} s")
        results = {}
        for config in configs:
            observer, rounding = config.split("+")
            out = subprocess.run(
                [sys.executable, "-c", CHILD, observer, rounding, tmp],
                capture_output=True,
                text=True,
                check=True,
            )
            results[config] = json.loads(out.stdout.strip().splitlines()[-1])
            print(config, results[config], flush=True)
    base = results.get("mse+nearest", {}).get("seconds")
    print("\n| observer+rounding | seconds | peak RSS GB | vs mse+nearest |\n|---|---|---|---|")
    for config, r in results.items():
        ratio = f"{r['seconds'] / base:.2f}x" if base else "n/a"
        print(f"| {config} | {r['seconds']:.1f} | {r['peak_gb']:.2f} | {ratio} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="*", help="observer+rounding, e.g. minmax+gptq")
    main(parser.parse_args().configs)
