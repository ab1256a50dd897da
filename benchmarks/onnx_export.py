"""ONNX file size and onnxruntime latency: refq's integer-weight models against float ones,
measured in the same run.

Two whole models exported with ``torch.onnx.export`` (examples/deploy_onnx.py): the
silero-vad-shaped model with silero-vad's trained weights (one 576-sample chunk per call,
batch 1), against PyTorch's export of the float model; and the tagger with a bidirectional LSTM
with projections (batch 4, 200 frames), against refq's export with every weight kept float
(``qscheme: none``), since PyTorch's export of a float LSTM with projections does not run. And
``refq export``'s model of a plain 2-layer LSTM (hidden 512, T 100, B 4), against the same
module's float export by PyTorch.

Sessions run on one thread, interleaved in rounds; the medians are compared.

    python benchmarks/onnx_export.py [--rounds N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import onnxruntime
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from deploy_onnx import SPEC, SileroVAD, Tagger, export, quantized, silero_weights

import refq_cli

FLOAT_SPEC = {"version": 1, "defaults": {"qscheme": "none"}}


def session(path: Path, fold: bool) -> onnxruntime.InferenceSession:
    """One thread; with ``fold``, DequantizeLinear of constants folded when the session loads
    (onnxruntime keeps them by default, for backends that fuse them)."""
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    if fold:
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    return onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def latencies(paths: dict[str, Path], args: tuple, rounds: int) -> dict[str, float]:
    """Median seconds per run of each model (refq's as it is and with its DequantizeLinear
    folded), timed in interleaved rounds."""
    sessions = {k: session(p, fold=False) for k, p in paths.items()}
    sessions["refq-folded"] = session(paths["refq"], fold=True)
    feeds = {
        k: {i.name: a.numpy() for i, a in zip(s.get_inputs(), args, strict=True)}
        for k, s in sessions.items()
    }
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(rounds):
        for k, s in sessions.items():
            start = time.perf_counter()
            s.run(None, feeds[k])
            times[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def report(name: str, paths: dict[str, Path], args: tuple, rounds: int) -> None:
    seconds = latencies(paths, args, rounds)
    sizes = {k: p.stat().st_size for k, p in paths.items()}
    print(
        f"{name}: float {sizes['float']:,} B, refq {sizes['refq']:,} B "
        f"({sizes['refq'] / sizes['float']:.2f}x); onnxruntime float "
        f"{seconds['float'] * 1e3:.3f} ms, refq {seconds['refq'] * 1e3:.3f} ms "
        f"({seconds['refq'] / seconds['float']:.2f}x; with DequantizeLinear folded "
        f"{seconds['refq-folded'] / seconds['float']:.2f}x)"
    )


def whole_models(out: Path, rounds: int) -> None:
    silero = SileroVAD().eval()
    if (weights := silero_weights()) is not None:
        silero.load_state_dict(weights)
    traced = SileroVAD.example(2)  # a dynamic dimension is traced at 2 or more
    paths = {
        "float": export(silero, traced, out / "silero.float.onnx", {0: "batch"}),
        "refq": export(
            quantized(silero, out, "silero"), traced, out / "silero.refq.onnx", {0: "batch"}
        ),
    }
    report("silero-vad (whole model), batch 1", paths, SileroVAD.example(1), rounds)

    tagger = Tagger().eval()
    facts = {"modules": {"lstm": {"batch_first": True, "dropout": 0.0}}}
    args = Tagger.example(4, 200)
    dims = {0: "batch", 2: "frames"}
    paths = {
        kind: export(
            quantized(tagger, out, f"tagger-{kind}", {**spec, **facts}),
            args,
            out / f"tagger.{kind}.onnx",
            dims,
        )
        for kind, spec in (("float", FLOAT_SPEC), ("refq", SPEC))
    }
    report("tagger, LSTM with projections (whole model), batch 4, 200 frames", paths, args, rounds)


def refq_export_models(out: Path, rounds: int) -> None:
    lstm = nn.LSTM(512, 512, num_layers=2).eval()
    torch.save({"lstm." + k: v for k, v in lstm.state_dict().items()}, out / "lstm.pt")
    artifact = refq_cli.convert(out / "lstm.pt", SPEC, out / "lstm.refq.safetensors").output
    (model,) = refq_cli.export(artifact, out / "lstm-onnx", initial_states=False)["models"]
    args = (torch.randn(100, 4, 512),)
    float_path = out / "lstm.float.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(lstm, args, float_path, dynamo=True, external_data=False, verbose=False)
    report(
        "LSTM 512x2, refq export vs PyTorch's float",
        {"float": float_path, "refq": Path(model["path"])},
        args,
        rounds,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=50)
    rounds = parser.parse_args().rounds
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        whole_models(Path(folder), rounds)
        refq_export_models(Path(folder), rounds)


if __name__ == "__main__":
    main()
