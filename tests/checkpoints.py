"""Small float models and the checkpoint files refq reads, written into a test's tmp_path."""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn


class Speech(nn.Module):
    """One of each recurrent family, in the layouts users ship."""

    def __init__(self) -> None:
        super().__init__()
        self.frontend = nn.Conv1d(4, 6, 3)
        self.encoder = nn.LSTM(6, 8, num_layers=2, bidirectional=True, proj_size=3)
        self.context = nn.GRU(6, 5, bias=False, batch_first=True)
        self.aux = nn.RNN(6, 4, nonlinearity="relu")
        self.decoder = nn.Module()
        self.decoder.cell = nn.LSTMCell(6, 7)
        self.gate = nn.GRUCell(6, 5)
        self.tanh_cell = nn.RNNCell(6, 4, bias=False)
        self.head = nn.Linear(7, 2)


class Nested(nn.Module):
    """A TorchScript-friendly model whose LSTMCell sits at _model.decoder.rnn."""

    def __init__(self) -> None:
        super().__init__()
        self._model = nn.Module()
        self._model.decoder = nn.Module()
        self._model.decoder.rnn = nn.LSTMCell(5, 6)
        self._model.conv = nn.Conv1d(5, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._model.decoder.rnn(x)[0]


def speech_calibration(tmp_path: Path, seed: int = 0, steps: int = 12, batch: int = 16) -> Path:
    """A calibration file for Speech: one random input per recurrent module, in its layout
    (batch_first for ``context``, as the tests' specs say)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in ("encoder", "context", "aux", "decoder.cell", "gate", "tanh_cell"):
        x = torch.randn(steps, batch, 6, generator=gen)
        tensors[name] = x.transpose(0, 1).contiguous() if name == "context" else x
    path = tmp_path / "calib.safetensors"
    save_file(tensors, path)
    return path


def speech_state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return Speech().state_dict()


def write(tmp_path: Path, kind: str, seed: int = 0) -> Path:
    """Write the Speech model (or Nested, for torchscript) in one of the accepted formats."""
    state = speech_state(seed)
    if kind in ("pt", "pth", "bin"):
        path = tmp_path / f"model.{kind}"
        torch.save(state, path)
    elif kind == "nested-state_dict":
        path = tmp_path / "nested.pt"
        torch.save({"state_dict": state, "epoch": 3}, path)
    elif kind == "nested-model":
        path = tmp_path / "nested_model.pt"
        torch.save({"model": state, "step": 10}, path)
    elif kind == "safetensors":
        path = tmp_path / "model.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, path)
    elif kind == "torchscript":
        torch.manual_seed(seed)
        path = tmp_path / "scripted.pt"
        torch.jit.save(torch.jit.script(Nested()), path)
    elif kind == "pickle":
        torch.manual_seed(seed)
        path = tmp_path / "module.pt"
        torch.save(Speech(), path)
    else:
        raise ValueError(kind)
    return path


FORMATS = ["pt", "pth", "bin", "nested-state_dict", "nested-model", "safetensors", "torchscript"]


def silero_file(name: str) -> Path:
    """A file of the silero-vad package: a trained model with an LSTMCell."""
    try:
        path = Path(str(files("silero_vad") / "data" / name))
    except ModuleNotFoundError:
        pytest.skip("silero-vad is not installed")
    if not path.exists():
        pytest.skip(f"silero-vad has no {name}")
    return path


class Tagger(nn.Module):
    """A 2-layer LSTM and a Linear head: the model the sharded checkpoints hold."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 6, num_layers=2)
        self.head = nn.Linear(6, 3)


def tagger_state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.detach().clone().contiguous() for k, v in Tagger().state_dict().items()}


SHARD_NAMES = {
    "safetensors": ("model.safetensors.index.json", "model-{:05d}-of-{:05d}.safetensors"),
    "bin": ("pytorch_model.bin.index.json", "pytorch_model-{:05d}-of-{:05d}.bin"),
}


def write_sharded(
    folder: Path,
    kind: str = "safetensors",
    state: dict[str, torch.Tensor] | None = None,
    parts: list[list[str]] | None = None,
) -> Path:
    """Write ``state`` (the Tagger's) as a Hugging Face sharded checkpoint of ``kind``
    (safetensors or bin) into ``folder``, and return its index. ``parts`` lists each shard's
    keys; by default layer 0 of the LSTM is in the first shard, layer 1 and the head in the
    second, so the LSTM is split across the two."""
    state = tagger_state() if state is None else state
    if parts is None:
        parts = [[k for k in state if "_l0" in k], [k for k in state if "_l0" not in k]]
    index_name, shard_name = SHARD_NAMES[kind]
    folder.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for n, keys in enumerate(parts, 1):
        name = shard_name.format(n, len(parts))
        tensors = {k: state[k] for k in keys}
        if kind == "safetensors":
            save_file(tensors, folder / name, metadata={"format": "pt"})
        else:
            torch.save(tensors, folder / name)
        weight_map.update(dict.fromkeys(keys, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    path = folder / index_name
    path.write_text(json.dumps(index, indent=2))
    return path
