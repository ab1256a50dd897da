"""``refq convert --out-dir --jobs N`` on many small checkpoints: workers against one process.

Measured in this run, as whole processes, on the same seeded checkpoints (a GRUCell and a
2-layer LSTM each), interleaved; the best of ``--repeat`` runs of each count. Target: ``--jobs
2`` at most 1.0x the wall time of ``--jobs 1`` on this machine, and faster on more cores.

    python benchmarks/batch_workers.py [--count 40] [--jobs 1 2] [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from batch_conversion import REFQ, SPEC, make_checkpoints, timed
from installed import compile_refq


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=40)
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    compile_refq()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "in").mkdir()
        make_checkpoints(folder / "in", args.count)
        best = {n: float("inf") for n in args.jobs}
        for _ in range(args.repeat):
            for n in args.jobs:
                command = [str(REFQ), "convert", str(folder / "in" / "*.pt"), "-q", str(SPEC)]
                command += ["--out-dir", str(folder / f"out{n}"), "--force", "--jobs", str(n)]
                best[n] = min(best[n], timed(command))
    base = best[args.jobs[0]]
    print(f"{args.count} checkpoints, {os.cpu_count()} cores, best of {args.repeat}\n")
    print("| --jobs | wall s | vs --jobs " + str(args.jobs[0]) + " |\n|---|---|---|")
    for n in args.jobs:
        print(f"| {n} | {best[n]:.2f} | {best[n] / base:.2f}x |")


if __name__ == "__main__":
    main()
