"""Whole models with refq's modules swapped in, exported with PyTorch's own ONNX exporter and
run in onnxruntime: a silero-vad-shaped model carrying silero-vad's trained weights (a conv
front end and an LSTMCell) and a speech tagger with a bidirectional LSTM with projections (which
PyTorch cannot export to ONNX, even in float).

    python examples/deploy_onnx.py [OUT_DIR]

Needs ``pip install 'refq[onnx]' onnxruntime``. For each model: convert its checkpoint, apply
the artifact to the model, ``torch.onnx.export`` it, and compare onnxruntime's outputs with
PyTorch's on inputs of two batch sizes (and two lengths for the tagger).
"""

from __future__ import annotations

import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

import refq_cli

SPEC = {"version": 1, "defaults": {"dtype": "qint8", "qscheme": "per_channel_symmetric"}}


class SileroVAD(nn.Module):
    """After silero-vad v5's 16 kHz model, whose trained weights it takes: a learned STFT, four
    conv blocks, an LSTMCell and a sigmoid head; one chunk of 512 samples (plus 64 of context)
    per call, its state carried. The forward is a reading of silero's architecture, not its
    code: its outputs are not silero-vad's own."""

    def __init__(self) -> None:
        super().__init__()
        self.stft_conv = nn.Conv1d(1, 258, 256, stride=128, bias=False)
        self.conv1 = nn.Conv1d(129, 128, 3, padding=1)
        self.conv2 = nn.Conv1d(128, 64, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(64, 64, 3, stride=2, padding=1)
        self.conv4 = nn.Conv1d(64, 128, 3, padding=1)
        self.lstm_cell = nn.LSTMCell(128, 128)
        self.final_conv = nn.Conv1d(128, 1, 1)

    def forward(
        self, chunk: torch.Tensor, h: torch.Tensor, c: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        spectrum = self.stft_conv(F.pad(chunk.unsqueeze(1), (0, 64), mode="reflect"))
        real, imag = spectrum[:, :129], spectrum[:, 129:]
        x = torch.sqrt(real * real + imag * imag)
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            x = torch.relu(conv(x))
        h, c = self.lstm_cell(x.squeeze(-1), (h, c))
        speech = torch.sigmoid(self.final_conv(torch.relu(h).unsqueeze(-1))).squeeze(-1)
        return speech, h, c

    @staticmethod
    def example(batch: int = 2) -> tuple[torch.Tensor, ...]:
        return torch.randn(batch, 576) * 0.1, torch.zeros(batch, 128), torch.zeros(batch, 128)


class Tagger(nn.Module):
    """Conv front end over 80 mel bins, a 2-layer bidirectional LSTM with projections, and a
    per-frame classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.frontend = nn.Conv1d(80, 128, 5, padding=2)
        self.lstm = nn.LSTM(
            128, 256, num_layers=2, proj_size=64, bidirectional=True, batch_first=True
        )
        self.head = nn.Linear(128, 40)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.frontend(mel)).transpose(1, 2)
        y, _ = self.lstm(x)
        return self.head(y)

    @staticmethod
    def example(batch: int = 2, frames: int = 50) -> tuple[torch.Tensor, ...]:
        return (torch.randn(batch, 80, frames),)


def silero_weights() -> dict[str, torch.Tensor] | None:
    """silero-vad's trained 16 kHz weights, if the package is installed."""
    try:
        from importlib.resources import files

        from safetensors.torch import load_file

        return load_file(str(files("silero_vad") / "data" / "silero_vad_16k.safetensors"))
    except (ImportError, FileNotFoundError):
        return None


def quantized(model: nn.Module, folder: Path, name: str, spec: dict = SPEC) -> nn.Module:
    """``model`` with its recurrent modules converted by refq and swapped in."""
    checkpoint = folder / f"{name}.pt"
    torch.save(model.state_dict(), checkpoint)
    conversion = refq_cli.convert(checkpoint, spec, folder / f"{name}.refq.safetensors", force=True)
    fresh = type(model)()
    return refq_cli.load_artifact(conversion.output).apply_to(fresh).eval()


def export(model: nn.Module, args: tuple, path: Path, dynamic: dict[int, str]) -> Path:
    """``torch.onnx.export`` with the first input's dims ``dynamic`` and the batch of every
    other input dynamic."""
    dims = {i: torch.export.Dim(n, min=2) for i, n in dynamic.items()}
    shapes = (dims, *({0: dims[0]} for _ in args[1:]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            args,
            path,
            dynamo=True,
            dynamic_shapes=shapes,
            external_data=False,
            verbose=False,
        )
    return path


def differences(model: nn.Module, path: Path, inputs: list[tuple], fuse: bool) -> float:
    """The largest difference between onnxruntime's outputs and PyTorch's over ``inputs``.

    ``fuse``: with onnxruntime's default optimizations, which fuse a DequantizeLinear and the
    MatMul it feeds into an integer-weight kernel (``com.microsoft.MatMulNBits``), computing
    in its own order; without, the graph's float semantics (basic optimizations only)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if not fuse:
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    worst = 0.0
    for args in inputs:
        got = session.run(None, {n: a.numpy() for n, a in zip(names, args, strict=True)})
        with torch.no_grad():
            want = torch.utils._pytree.tree_leaves(model(*args))
        for a, b in zip(got, want, strict=True):
            worst = max(worst, float((torch.from_numpy(a) - b).abs().max()))
    return worst


def integer_weights(path: Path) -> tuple[int, int]:
    """How many DequantizeLinear nodes the model has, and how many integer initializers."""
    import onnx

    graph = onnx.load(path).graph
    dequantize = sum(n.op_type == "DequantizeLinear" for n in graph.node)
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.INT64)
    return dequantize, sum(i.data_type not in floats for i in graph.initializer)


# per model: how to make it, its spec's facts (what weights cannot tell), its dynamic dims and
# the inputs it is checked on
CASES: dict[str, tuple[Callable[[], nn.Module], dict, dict[int, str], list[tuple]]] = {
    "silero-vad": (
        SileroVAD,
        {},
        {0: "batch"},
        [SileroVAD.example(2), SileroVAD.example(5)],
    ),
    "tagger": (
        Tagger,
        {"lstm": {"batch_first": True, "dropout": 0.0}},
        {0: "batch", 2: "frames"},
        [Tagger.example(2, 50), Tagger.example(3, 17)],
    ),
}


def main(out: Path) -> None:
    torch.manual_seed(0)
    out.mkdir(parents=True, exist_ok=True)
    for name, (make, facts, dynamic, inputs) in CASES.items():
        model = make().eval()
        if name == "silero-vad" and (weights := silero_weights()) is not None:
            model.load_state_dict(weights)
        refq_model = quantized(model, out, name, {**SPEC, "modules": facts})
        path = export(refq_model, inputs[0], out / f"{name}.refq.onnx", dynamic)
        dequantize, integers = integer_weights(path)
        exact, fused = (differences(refq_model, path, inputs, fuse) for fuse in (False, True))
        print(
            f"{name}: {path.name} {path.stat().st_size:,} bytes, {dequantize} DequantizeLinear, "
            f"{integers} integer initializers; onnxruntime vs PyTorch max abs diff "
            f"{exact:.2e} ({fused:.2e} with onnxruntime's integer fusions)"
        )


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as folder:
            main(Path(folder))
