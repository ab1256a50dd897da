"""Many small checkpoints: one ``refq convert --out-dir`` call against one call per checkpoint.

Both are measured in this run, as whole processes, on the same seeded checkpoints (a GRUCell
and a 2-layer LSTM each). Target: the single call at least 20x faster.

    python benchmarks/batch_conversion.py [--count 200]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from installed import compile_refq
from torch import nn

REFQ = Path(sys.executable).with_name("refq")
SPEC = Path(__file__).resolve().parents[1] / "configs" / "int8-per-channel-symmetric.yaml"


def make_checkpoints(folder: Path, count: int) -> list[Path]:
    paths = []
    for i in range(count):
        torch.manual_seed(i)
        model = nn.ModuleDict({"cell": nn.GRUCell(32, 32), "rnn": nn.LSTM(32, 32, num_layers=2)})
        path = folder / f"ckpt{i:04d}.pt"
        torch.save(model.state_dict(), path)
        paths.append(path)
    return paths


def timed(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(args, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200)
    args = parser.parse_args()
    compile_refq()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paths = make_checkpoints(folder, args.count)
        one_call = timed(
            [
                str(REFQ),
                "convert",
                *map(str, paths),
                "-q",
                str(SPEC),
                "--out-dir",
                str(folder / "batch"),
                "--quiet",
            ]
        )
        separate = 0.0
        (folder / "single").mkdir()
        for path in paths:
            separate += timed(
                [
                    str(REFQ),
                    "convert",
                    str(path),
                    "-q",
                    str(SPEC),
                    "-o",
                    str(folder / "single" / (path.stem + ".refq.safetensors")),
                    "--quiet",
                ]
            )
        same = all(
            (folder / "batch" / (p.stem + ".refq.safetensors")).read_bytes()
            == (folder / "single" / (p.stem + ".refq.safetensors")).read_bytes()
            for p in paths
        )
    ratio = separate / one_call
    print(
        f"{args.count} checkpoints: one call {one_call:.1f} s, {args.count} calls "
        f"{separate:.1f} s, ratio {ratio:.1f}x (target >= 20x: "
        f"{'met' if ratio >= 20 else 'missed'}); artifacts identical: {same}"
    )


if __name__ == "__main__":
    main()
