"""Float modules and tie-heavy quantization parameters for the reference-module tests."""

from __future__ import annotations

import torch
from torch import nn

from refq_cli import reference

FLOAT_CELLS = {
    "RNNCell-tanh": lambda i, h, bias: nn.RNNCell(i, h, bias, nonlinearity="tanh"),
    "RNNCell-relu": lambda i, h, bias: nn.RNNCell(i, h, bias, nonlinearity="relu"),
    "LSTMCell": lambda i, h, bias: nn.LSTMCell(i, h, bias),
    "GRUCell": lambda i, h, bias: nn.GRUCell(i, h, bias),
}
REFERENCE_TYPE = reference.REFERENCE_TYPES


def weight_names(mod: nn.Module) -> list[str]:
    return [n for n, _ in mod.named_parameters() if n.startswith("weight")]


def tie_heavy_qparams(
    mod: nn.Module, per_channel: bool, dtype: str, seed: int = 0, is_decomposed: bool = False
) -> dict:
    """Min/max qparams for every weight of ``mod``, with a tenth of its entries moved onto ties.

    qint8 gets symmetric parameters (whose extremes sit exactly on a tie, as with PyTorch's
    symmetric observers), quint8 affine ones. Entries use PyTorch's objects so that the same
    dict serves torch.ao's modules and refq's.
    """
    gen = torch.Generator().manual_seed(seed)
    qparams: dict = {"is_decomposed": is_decomposed}
    for name in weight_names(mod):
        w = getattr(mod, name)
        dims = 1 if per_channel else tuple(range(w.dim()))
        if dtype == "qint8":
            scale = w.detach().abs().amax(dim=dims) / 127.5
            zero_point = torch.zeros_like(scale, dtype=torch.int32)
        else:
            lo = w.detach().amin(dim=dims).clamp(max=0)
            hi = w.detach().amax(dim=dims).clamp(min=0)
            scale = (hi - lo) / 255
            zero_point = (-lo / scale).round().clamp(0, 255).to(torch.int32)
        s = scale.reshape(-1, 1) if per_channel else scale
        k = torch.randint(-100, 100, w.shape, generator=gen).float()
        on_tie = torch.rand(w.shape, generator=gen) < 0.1
        with torch.no_grad():
            w.copy_(torch.where(on_tie, (k + 0.5) * s, w))
        entry = {
            "qscheme": torch.per_channel_affine if per_channel else torch.per_tensor_affine,
            "dtype": getattr(torch, dtype),
            "scale": scale if per_channel else float(scale),
            "zero_point": zero_point if per_channel else int(zero_point),
        }
        if per_channel:
            entry["axis"] = 0
        qparams[name] = entry
    return qparams
