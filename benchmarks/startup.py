"""Start-up time: ``refq --help`` and ``refq inspect`` against ``python -c "import torch"``.

Each command runs as a whole process, in interleaved rounds, in this run; medians are compared.
Target: ``refq --help`` and ``refq inspect`` each at most 0.25x the time of importing torch.
``refq inspect`` reads the artifact's header and its scales and zero points, never the integer
codes, and imports no torch (the tests prove both).

    python benchmarks/startup.py [--rounds N]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from installed import compile_refq

ROOT = Path(__file__).resolve().parents[1]
REFQ = str(Path(sys.executable).with_name("refq"))


def seconds(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    compile_refq()
    with tempfile.TemporaryDirectory() as tmp:
        artifact = Path(tmp) / "example.refq.safetensors"
        subprocess.run(
            [
                REFQ,
                "convert",
                str(ROOT / "examples" / "models" / "example.pt"),
                "-q",
                str(ROOT / "configs" / "int8-per-channel-symmetric.yaml"),
                "-o",
                str(artifact),
                "--quiet",
            ],
            check=True,
        )
        commands = {
            "import torch": [sys.executable, "-c", "import torch"],
            "refq --help": [REFQ, "--help"],
            "refq inspect": [REFQ, "inspect", str(artifact)],
        }
        times: dict[str, list[float]] = {k: [] for k in commands}
        for _ in range(args.rounds):
            for label, command in commands.items():
                times[label].append(seconds(command))
    median = {k: statistics.median(v) for k, v in times.items()}
    for label, value in median.items():
        ratio = value / median["import torch"]
        print(f"{label:13} {value:6.3f} s  {ratio:5.2f}x import torch")
    for label in ("refq --help", "refq inspect"):
        verdict = "met" if median[label] <= 0.25 * median["import torch"] else "missed"
        print(f"{label}: target <= 0.25x import torch: {verdict}")


if __name__ == "__main__":
    main()
