"""Reference-module forward time as a ratio to the float module, and to torch.ao's reference.

Two-layer LSTM and GRU, hidden size 1024, at (T=1, B=1) and (T=50, B=8) on CPU, at (T=1, B=1)
and (T=64, B=16) on CUDA (float there is cuDNN). Every figure is measured in this run: the
three modules are timed in interleaved rounds and the medians compared. Targets: refq within
1.10x of float on CPU, 1.2x on CUDA.

    python benchmarks/reference_forward.py [--rounds N] [--hidden H] [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from torch import nn

from refq_cli import reference

warnings.filterwarnings("ignore")


def int8_per_channel(mod: nn.Module) -> dict:
    qparams: dict = {"is_decomposed": False}
    for name, w in mod.named_parameters():
        if name.startswith("weight"):
            scale = w.detach().abs().amax(dim=1) / 127.5
            qparams[name] = {
                "qscheme": torch.per_channel_affine,
                "dtype": torch.qint8,
                "scale": scale,
                "zero_point": torch.zeros_like(scale, dtype=torch.int32),
                "axis": 0,
            }
    return qparams


def torch_ao_module(float_mod: nn.Module, qparams: dict) -> nn.Module | None:
    try:
        import torch.ao.nn.quantized.reference as ao_reference
    except Exception:
        return None
    return getattr(ao_reference, type(float_mod).__name__).from_float(float_mod, qparams)


def interleaved_median_ms(modules: dict[str, nn.Module], x: torch.Tensor, rounds: int) -> dict:
    """One call of each module per round, so load drift on a shared machine hits all alike."""
    times: dict[str, list[float]] = {key: [] for key in modules}
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    with torch.inference_mode():
        for module in modules.values():
            module(x)  # warm-up (and, for refq, the one-time weight quantization)
        for _ in range(rounds):
            for key, module in modules.items():
                sync()
                start = time.perf_counter()
                module(x)
                sync()
                times[key].append(time.perf_counter() - start)
    return {key: statistics.median(t) * 1e3 for key, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=45)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    shapes, target = (((1, 1), (64, 16)), 1.2) if cuda else (((1, 1), (50, 8)), 1.10)
    torch.manual_seed(0)
    where = torch.cuda.get_device_name() if cuda else f"{torch.get_num_threads()} CPU threads"
    print(f"torch {torch.__version__}, {where}, hidden {args.hidden}")
    header = f"{'module':6} {'T':>3} {'B':>2} {'float ms':>9} {'refq ms':>9} {'refq/float':>10}"
    print(header + f" {'torch.ao ms':>11} {'ao/float':>8}")
    worst = 0.0
    for float_type in (nn.LSTM, nn.GRU):
        float_mod = float_type(args.hidden, args.hidden, num_layers=2).to(args.device).eval()
        qparams = int8_per_channel(float_mod)
        ours = type(float_mod).__name__
        ref = getattr(reference, ours).from_float(float_mod, qparams).eval()
        ao = torch_ao_module(float_mod, qparams)
        for steps, batch in shapes:
            x = torch.randn(steps, batch, args.hidden, device=args.device)
            modules = {"float": float_mod, "refq": ref, "ao": ao}
            modules = {key: m for key, m in modules.items() if m is not None}
            rounds = args.rounds if steps == 1 else max(5, args.rounds // 3)
            ms = interleaved_median_ms(modules, x, rounds)
            ratio = ms["refq"] / ms["float"]
            worst = max(worst, ratio)
            line = (
                f"{ours:6} {steps:3} {batch:2} {ms['float']:9.2f} {ms['refq']:9.2f} {ratio:9.2f}x"
            )
            if "ao" in ms:
                line += f" {ms['ao']:11.2f} {ms['ao'] / ms['float']:7.2f}x"
            print(line)
    verdict = "met" if worst <= target else "missed"
    print(f"worst refq/float: {worst:.2f}x (target <= {target:.2f}x: {verdict})")


if __name__ == "__main__":
    main()
