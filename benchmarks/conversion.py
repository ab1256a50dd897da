"""Whole-process conversion of the 576 MB checkpoint: refq convert against two baselines.

Measured in this run with /usr/bin/time (wall seconds, peak RSS), each as its own process:

* ``torch.ao``: what a user writes by hand today: load, per-channel observers, ``from_float``
  for each recurrent module, ``get_quantized_weight_bias_dict``, integer representations into
  ``safetensors.save_file``;
* ``lower bound``: mmap'd ``torch.load``, per-channel ``aminmax``, quantize, ``save_file``; no
  report, no checks;
* ``refq convert`` with the int8 per-channel symmetric preset, report included;
* the same with ``--probe-steps 0``: no probe, what the rest of the conversion costs.

Targets: refq at most 0.5x torch.ao's wall time, 1.25x the lower bound's, and 1.05x its peak RSS;
with ``--probe-steps 0`` at most 1.05x the lower bound's wall time.

    python benchmarks/conversion.py [--layers 4] [--repeat 3]

Each command runs ``--repeat`` times, interleaved; the best wall time and the highest peak RSS
count (the machine's noise only ever adds time).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from installed import compile_refq

ROOT = Path(__file__).resolve().parents[1]
REFQ = Path(sys.executable).with_name("refq")

TORCH_AO = """
import sys, warnings
warnings.filterwarnings("ignore")
import torch
from safetensors.torch import save_file
from torch import nn
import torch.ao.nn.quantized.reference as ref
from torch.ao.quantization.observer import PerChannelMinMaxObserver
sys.path.insert(0, sys.argv[3])
from big_checkpoint import build
state = torch.load(sys.argv[1], mmap=True, weights_only=True)
model = build(int(sys.argv[4]))
model.load_state_dict(state)
out = {}
for name, mod in model.named_children():
    recurrent = type(mod).__name__ in ("LSTM", "GRU", "LSTMCell", "GRUCell", "RNNCell")
    kind = getattr(ref, type(mod).__name__) if recurrent else None
    if kind is None:
        for k, v in mod.state_dict().items():
            out[f"{name}.{k}"] = v
        continue
    qparams = {"is_decomposed": False}
    for wn, w in mod.named_parameters():
        if wn.startswith("weight"):
            obs = PerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint8,
                                           qscheme=torch.per_channel_symmetric)
            obs(w.detach())
            s, z = obs.calculate_qparams()
            qparams[wn] = {"qscheme": torch.per_channel_affine, "dtype": torch.qint8,
                           "scale": s, "zero_point": z, "axis": 0}
    r = kind.from_float(mod, qparams)
    if hasattr(r, "get_quantized_weight_bias_dict"):
        items = r.get_quantized_weight_bias_dict().items()
    else:
        items = [(n, getattr(r, "get_quantized_" + n)() if n.startswith("weight")
                  else getattr(r, n)) for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    for k, v in items:
        if v is None:
            continue
        if v.is_quantized:
            out[f"{name}.{k}"] = v.int_repr()
            out[f"{name}.{k}_scale"] = v.q_per_channel_scales().float()
            out[f"{name}.{k}_zero_point"] = v.q_per_channel_zero_points().int()
        else:
            out[f"{name}.{k}"] = v.detach().contiguous()
save_file(out, sys.argv[2])
"""

LOWER_BOUND = """
import sys
import torch
from safetensors.torch import save_file
state = torch.load(sys.argv[1], mmap=True, weights_only=True)
out = {}
for k, w in state.items():
    if ".weight_" in k or k.endswith(("weight_ih", "weight_hh")):
        lo, hi = torch.aminmax(w, dim=1)
        s = (torch.maximum(-lo, hi) / 127.5).clamp(min=1e-12)
        out[k] = torch.round(w / s[:, None]).clamp(-128, 127).to(torch.int8)
        out[k + "_scale"] = s
        out[k + "_zero_point"] = torch.zeros_like(s, dtype=torch.int32)
    else:
        out[k] = w
save_file(out, sys.argv[2])
"""


def measure(args: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (GB) of one process, from /usr/bin/time."""
    result = subprocess.run(
        ["/usr/bin/time", "-f", "%e %M", *args], capture_output=True, text=True, check=True
    )
    wall, kb = result.stderr.strip().splitlines()[-1].split()
    return float(wall), int(kb) / 1024**2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs of each, interleaved; the best counts"
    )
    args = parser.parse_args()
    compile_refq()
    bench = Path(__file__).resolve().parent
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        ckpt = folder / "model.pt"
        subprocess.run(
            [
                sys.executable,
                str(bench / "big_checkpoint.py"),
                str(ckpt),
                "--layers",
                str(args.layers),
            ],
            check=True,
        )
        for name, code in (("ao.py", TORCH_AO), ("lower.py", LOWER_BOUND)):
            (folder / name).write_text(textwrap.dedent(code))
        refq_args = [
            "convert",
            str(ckpt),
            "-q",
            str(ROOT / "configs" / "int8-per-channel-symmetric.yaml"),
            "--quiet",
            "--force",
            "-o",
        ]
        commands = {
            "torch.ao": [
                sys.executable,
                str(folder / "ao.py"),
                str(ckpt),
                str(folder / "ao.safetensors"),
                str(bench),
                str(args.layers),
            ],
            "lower bound": [
                sys.executable,
                str(folder / "lower.py"),
                str(ckpt),
                str(folder / "low.safetensors"),
            ],
            "refq convert": [str(REFQ), *refq_args, str(folder / "refq.safetensors")],
            "refq, no probe": [
                str(REFQ),
                *refq_args[:-1],
                "--probe-steps",
                "0",
                "-o",
                str(folder / "np.safetensors"),
            ],
        }
        runs: dict[str, list[tuple[float, float]]] = {k: [] for k in commands}
        for _ in range(args.repeat):
            for label, command in commands.items():
                runs[label].append(measure(command))
    best = {k: (min(w for w, _ in v), max(r for _, r in v)) for k, v in runs.items()}
    for label, (wall, rss) in best.items():
        walls = ", ".join(f"{w:.2f}" for w, _ in runs[label])
        print(f"{label:14} {wall:6.2f} s  {rss:5.2f} GB peak RSS   (runs: {walls} s)")
    ao, low, refq = best["torch.ao"], best["lower bound"], best["refq convert"]
    print(
        f"refq / torch.ao wall {refq[0] / ao[0]:.2f}x (target <= 0.5x); refq / lower bound "
        f"wall {refq[0] / low[0]:.2f}x (target <= 1.25x), peak RSS {refq[1] / low[1]:.2f}x "
        "(target <= 1.05x)"
    )
    bare = best["refq, no probe"]
    print(
        f"--probe-steps 0: {bare[0] / ao[0]:.2f}x torch.ao, {bare[0] / low[0]:.2f}x the lower "
        f"bound (target <= 1.05x), peak RSS {bare[1] / low[1]:.2f}x; the probe's share of refq's "
        f"wall time: {refq[0] - bare[0]:.2f} s"
    )


if __name__ == "__main__":
    main()
