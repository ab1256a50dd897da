"""Mean weight SQNR of the mse observer against minmax, on the recurrent weights of checkpoints.

    python benchmarks/observer_sqnr.py CHECKPOINT [CHECKPOINT ...]

With no argument: the bundled example model and, when silero-vad is installed, its trained
LSTMCell (.safetensors). The issue's target is mse ahead by >= 1 dB at 8-bit per-tensor and at
4-bit per-channel; the last column is the best any clipping range can do at 8-bit per-tensor
affine (an exhaustive search over both ends), which bounds what an observer can reach.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

from refq_cli.io.checkpoint import load_checkpoint
from refq_cli.quant.numerics import fake_quantize
from refq_cli.quant.observers import _from_range, observe
from refq_cli.quant.statistics import sqnr_db, weight_stats
from refq_cli.spec.spec import QParamSpec

SCHEMES = [
    ("qint8", "per_tensor_affine"),
    ("qint8", "per_tensor_symmetric"),
    ("int4", "per_channel_symmetric"),
    ("int4", "per_channel_affine"),
]


def spec(observer: str, dtype: str, qscheme: str) -> QParamSpec:
    return QParamSpec(dtype=dtype, qscheme=qscheme, axis=0, observer=observer, percentile=99.99)


def best_clipping_db(w) -> float:
    """Exhaustive search of [a * min, b * max] for 8-bit per-tensor affine."""
    s = spec("minmax", "qint8", "per_tensor_affine")
    lo, hi = w.min().reshape(1), w.max().reshape(1)
    grid = [i / 50 for i in range(10, 51)]
    return max(
        sqnr_db(w, fake_quantize(w, _from_range(lo * a, hi * b, s, "w")))
        for a in grid
        for b in grid
    )


def main(paths: list[str]) -> None:
    if not paths:
        paths = [str(Path(__file__).resolve().parents[1] / "examples" / "models" / "example.pt")]
        try:
            from importlib.resources import files

            paths.append(str(files("silero_vad") / "data" / "silero_vad_16k.safetensors"))
        except ModuleNotFoundError:
            pass
    header = " | ".join(f"{d} {q}" for d, q in SCHEMES)
    print(f"| checkpoint | {header} | best clipping, 8-bit per-tensor affine |")
    print("|---" * (len(SCHEMES) + 2) + "|")
    for path in paths:
        ckpt = load_checkpoint(path)
        weights = [
            ckpt.tensors[m.key(n)].float() for m in ckpt.modules.values() for n in m.weight_names
        ]
        cells = []
        for dtype, qscheme in SCHEMES:
            gains = []
            for w in weights:
                by = {
                    o: weight_stats(w, observe(w, spec(o, dtype, qscheme), "w"), False)["sqnr_db"]
                    for o in ("minmax", "mse")
                }
                gains.append((by["minmax"], by["mse"]))
            mm = statistics.mean(g[0] for g in gains)
            ms = statistics.mean(g[1] for g in gains)
            cells.append(f"{mm:.2f} -> {ms:.2f} ({ms - mm:+.2f} dB)")
        minmax8 = statistics.mean(
            weight_stats(w, observe(w, spec("minmax", *SCHEMES[0]), "w"), False)["sqnr_db"]
            for w in weights
        )
        bound = statistics.mean(best_clipping_db(w) for w in weights) - minmax8
        print(f"| {Path(path).name} | {' | '.join(cells)} | {bound:+.2f} dB |")


if __name__ == "__main__":
    main(sys.argv[1:])
