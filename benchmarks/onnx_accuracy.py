"""How closely `refq export`'s ONNX models follow refq's modules, per module type and scheme.

Each module (2 layers, bidirectional and batch-first where it has them) is saved, converted
with `refq_cli.convert`, exported with `refq_cli.export` and run in onnxruntime (CPU) on
unit-scale random inputs and initial states, against the artifact's reference module in
PyTorch: the largest absolute difference over the outputs and final states. (That every
DequantizeLinear output equals the module's weight bit for bit, tests/deploy/test_onnx_graph.py
checks.)

    python benchmarks/onnx_accuracy.py
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import onnxruntime
import torch
from torch import nn

import refq_cli

MODULES = {
    "RNNCell tanh": lambda: nn.RNNCell(24, 32),
    "RNNCell relu": lambda: nn.RNNCell(24, 32, nonlinearity="relu"),
    "LSTMCell": lambda: nn.LSTMCell(24, 32),
    "GRUCell": lambda: nn.GRUCell(24, 32),
    "RNN": lambda: nn.RNN(24, 32, num_layers=2, bidirectional=True, batch_first=True),
    "LSTM": lambda: nn.LSTM(24, 32, num_layers=2, bidirectional=True, batch_first=True),
    "LSTM proj_size": lambda: nn.LSTM(
        24, 32, num_layers=2, bidirectional=True, batch_first=True, proj_size=16
    ),
    "GRU": lambda: nn.GRU(24, 32, num_layers=2, bidirectional=True, batch_first=True),
}
SCHEMES = {
    "qint8 per-channel": ("qint8", "per_channel_symmetric"),
    "quint8 per-tensor": ("quint8", "per_tensor_affine"),
    "int4 per-channel": ("int4", "per_channel_symmetric"),
}


def measure(make, dtype: str, qscheme: str, folder: Path) -> float:
    float_module = make()
    torch.save({"m." + k: v for k, v in float_module.state_dict().items()}, folder / "m.pt")
    facts = (
        {"nonlinearity": float_module.nonlinearity} if hasattr(float_module, "nonlinearity") else {}
    )
    if not isinstance(float_module, nn.RNNCellBase):
        facts |= {"batch_first": float_module.batch_first, "dropout": 0.0}
    spec = {
        "version": 1,
        "defaults": {"dtype": dtype, "qscheme": qscheme},
        "modules": {"m": facts} if facts else None,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        artifact = refq_cli.convert(folder / "m.pt", spec, folder / "m.st", force=True).output
    (exported,) = refq_cli.export(artifact, folder / "onnx", force=True)["models"]
    module = refq_cli.load_artifact(artifact).modules["m"]
    cell = isinstance(module, nn.RNNCellBase)
    gen = torch.Generator().manual_seed(0)
    batch, steps = 3, 11
    x = torch.randn(*((batch,) if cell else (batch, steps)), module.input_size, generator=gen)
    states = (batch,) if cell else (module.num_layers * (1 + module.bidirectional), batch)
    h = torch.randn(*states, getattr(module, "proj_size", 0) or module.hidden_size, generator=gen)
    feeds, hx = {"input": x, "h_0": h}, h
    if module.mode == "LSTM":
        feeds["c_0"] = torch.randn(*states, module.hidden_size, generator=gen)
        hx = (h, feeds["c_0"])

    session = onnxruntime.InferenceSession(exported["path"], providers=["CPUExecutionProvider"])
    got = session.run(None, {k: v.numpy() for k, v in feeds.items()})
    with torch.no_grad():
        want = torch.utils._pytree.tree_leaves(module(x, hx))
    return max(float((torch.from_numpy(a) - b).abs().max()) for a, b in zip(got, want, strict=True))


def main() -> None:
    torch.manual_seed(0)
    print(f"| module | {' | '.join(SCHEMES)} |")
    print("|---|" + "---|" * len(SCHEMES))
    with tempfile.TemporaryDirectory() as folder:
        for name, make in MODULES.items():
            cells = []
            for dtype, qscheme in SCHEMES.values():
                cells.append(f"{measure(make, dtype, qscheme, Path(folder)):.1e}")
            print(f"| {name} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
