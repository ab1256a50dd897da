"""Whole-process ``refq convert`` of the 576 MB checkpoint, int4 per channel: ``observer: mse``
against ``observer: minmax``.

Measured in this run with /usr/bin/time, interleaved; the best of ``--repeat`` runs each.
Target: mse at most 1.5x minmax's wall time (and the same artifact bytes as the exhaustive
search it replaced, which ``tests/test_observers.py`` checks). Then, in this process, one
8192x2048 weight (seeded normal values): the exhaustive search (every ratio on every row)
against refq's, seconds each and whether they choose the same, at int8 and int4.

    python benchmarks/observer_time.py [--layers 4] [--repeat 3]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conversion import REFQ, measure

SPEC = "version: 1\ndefaults: {{dtype: int4, qscheme: per_channel_symmetric, observer: {}}}\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    bench = Path(__file__).resolve().parent
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        ckpt = folder / "model.pt"
        command = [sys.executable, str(bench / "big_checkpoint.py"), str(ckpt)]
        subprocess.run([*command, "--layers", str(args.layers)], check=True)
        best = {}
        for _ in range(args.repeat):
            for observer in ("minmax", "mse"):
                spec = folder / f"{observer}.yaml"
                spec.write_text(SPEC.format(observer))
                out = folder / f"{observer}.refq.safetensors"
                args_ = ["convert", str(ckpt), "-q", str(spec), "-o", str(out), "--force"]
                wall, rss = measure([str(REFQ), *args_, "--quiet"])
                old = best.get(observer, (float("inf"), 0.0))
                best[observer] = (min(old[0], wall), max(old[1], rss))
    print("| observer | wall s | peak RSS GB | vs minmax |\n|---|---|---|---|")
    for observer, (wall, rss) in best.items():
        print(f"| {observer} | {wall:.2f} | {rss:.2f} | {wall / best['minmax'][0]:.2f}x |")
    one_weight()


def one_weight() -> None:
    """The exhaustive search against refq's on one weight, in this process."""
    from dataclasses import replace

    import torch

    from refq_cli.quant import observers
    from refq_cli.spec.spec import QParamSpec

    w = torch.randn(8192, 2048, generator=torch.Generator().manual_seed(0))
    print("\n| 8192x2048 weight | exhaustive s | search s | same choice |\n|---|---|---|---|")
    for dtype in ("qint8", "int4"):
        spec = QParamSpec(dtype, "per_channel_symmetric", 0, "mse", 99.99)
        lo, hi = observers._row_range(w)
        grid = torch.linspace(1.0, 0.01, observers.MSE_CANDIDATES).tolist()
        qps = [observers._from_range(lo * r, hi * r, replace(spec, axis=0), "w") for r in grid]
        seconds, choices = [], []
        for search in (observers._all_errors, observers._searched_errors):
            start = time.perf_counter()
            choices.append(search(w, qps).nan_to_num_(nan=float("inf")).argmin(dim=1))
            seconds.append(time.perf_counter() - start)
        same = torch.equal(*choices)
        print(f"| {dtype} | {seconds[0]:.2f} | {seconds[1]:.2f} | {same} |")


if __name__ == "__main__":
    main()
