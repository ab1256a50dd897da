"""The bundled example: a small speech-style model with an LSTM, a GRUCell and linear layers.

Run this file to (re)write ``examples/models/example.pt``: the model trained, from a fixed seed,
on a synthetic task (tell ten noisy frequency patterns apart), so its weights look like trained
weights rather than their random initialisation.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

CHECKPOINT = Path(__file__).parent / "models" / "example.pt"
FEATURES, STEPS, CLASSES = 20, 25, 10


class ExampleModel(nn.Module):
    """Features -> linear front end -> 2-layer LSTM -> GRUCell over the last step -> classes."""

    def __init__(self, features: int = FEATURES, hidden: int = 48, classes: int = CLASSES) -> None:
        super().__init__()
        self.frontend = nn.Linear(features, hidden)
        self.encoder = nn.LSTM(hidden, hidden, num_layers=2, batch_first=True)
        self.decoder = nn.GRUCell(hidden, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq, _ = self.encoder(torch.relu(self.frontend(x)))
        h = self.decoder(seq[:, -1])
        return self.head(h)


def batch(gen: torch.Generator, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences whose feature k oscillates at a class-dependent frequency, plus noise."""
    labels = torch.randint(0, CLASSES, (size,), generator=gen)
    t = torch.arange(STEPS).float()
    k = torch.arange(FEATURES).float()
    freq = (labels.float() + 1).reshape(-1, 1, 1) * 0.05
    phase = torch.rand(size, 1, 1, generator=gen) * 2 * math.pi
    x = torch.sin(freq * t.reshape(1, -1, 1) * (1 + k / FEATURES) + phase)
    return x + 0.3 * torch.randn(x.shape, generator=gen), labels


def train(seed: int = 0, steps: int = 600) -> ExampleModel:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = ExampleModel()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        x, y = batch(gen)
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


if __name__ == "__main__":
    model = train()
    x, y = batch(torch.Generator().manual_seed(123), 512)
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    CHECKPOINT.parent.mkdir(exist_ok=True)
    torch.save(model.state_dict(), CHECKPOINT)
    print(f"wrote {CHECKPOINT}: held-out accuracy {accuracy:.1%}")
