"""The bundled example: a small speech-style model with an LSTM, a GRUCell and linear layers.

Run this file to (re)write ``examples/models/example.pt``, a seeded ``state_dict``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

CHECKPOINT = Path(__file__).parent / "models" / "example.pt"


class ExampleModel(nn.Module):
    """Features -> linear front end -> 2-layer LSTM -> GRUCell over the last step -> classes."""

    def __init__(self, features: int = 20, hidden: int = 48, classes: int = 10) -> None:
        super().__init__()
        self.frontend = nn.Linear(features, hidden)
        self.encoder = nn.LSTM(hidden, hidden, num_layers=2, batch_first=True)
        self.decoder = nn.GRUCell(hidden, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq, _ = self.encoder(torch.relu(self.frontend(x)))
        h = self.decoder(seq[:, -1])
        return self.head(h)


def build(seed: int = 0) -> ExampleModel:
    torch.manual_seed(seed)
    return ExampleModel().eval()


if __name__ == "__main__":
    CHECKPOINT.parent.mkdir(exist_ok=True)
    torch.save(build().state_dict(), CHECKPOINT)
    print(f"wrote {CHECKPOINT}")
