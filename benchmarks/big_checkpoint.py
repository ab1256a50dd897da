"""Write the 576 MB float checkpoint the conversion benchmarks use (seeded, a state_dict).

A Linear, a 4-layer nn.LSTM(1024, 2048), an nn.GRU(2048, 1024), an nn.LSTMCell(1024, 1024) and a
Linear head. ``--layers 8`` gives the LSTM eight layers, a checkpoint twice as large (1.15 GB):
memory must grow with the largest tensor, not with the file.

    python benchmarks/big_checkpoint.py OUT.pt [--layers 4]
"""

from __future__ import annotations

import argparse

import torch
from torch import nn


def build(layers: int) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Module()
    model.frontend = nn.Linear(80, 1024)
    model.encoder = nn.LSTM(1024, 2048, num_layers=layers)
    model.context = nn.GRU(2048, 1024)
    model.decoder = nn.LSTMCell(1024, 1024)
    model.head = nn.Linear(1024, 512)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    state = build(args.layers).state_dict()
    torch.save(state, args.out)
    size = sum(t.numel() * t.element_size() for t in state.values())
    print(f"wrote {args.out}: {size / 1e6:.0f} MB of tensors")


if __name__ == "__main__":
    main()
