"""The same input and spec give the same bytes and numbers: whatever the thread count or the
number of worker processes, and however often an artifact is verified."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from refq_cli.pipeline.artifact import load_artifact
from refq_cli.pipeline.convert import convert_checkpoint as convert
from refq_cli.pipeline.verify import verify
from refq_cli.quant import numerics as quant
from refq_cli.quant import observers
from refq_cli.quant.numerics import WeightQParams
from refq_cli.quant.statistics import quantize_and_measure, sqnr_db
from refq_cli.spec.spec import QParamSpec
from tests.scripts import run_refq

SPEC = """\
version: 1
rules:
  - {match: "*", qscheme: per_tensor_affine, dtype: quint8}
modules:
  rnn: {dropout: 0.3}
"""


class Model(nn.Module):
    """Big enough that torch splits its reductions between threads."""

    def __init__(self, layers: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.rnn = nn.LSTM(256, 512, num_layers=layers, dropout=dropout)


def checkpoint(path: Path, seed: int = 0, layers: int = 1, dropout: float = 0.0) -> Path:
    torch.manual_seed(seed)
    torch.save(Model(layers, dropout).state_dict(), path)
    return path


@pytest.fixture
def threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_sums_of_squares_are_exact_enough_and_shaped_per_row():
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(3, 100_003, generator=gen) * 0.02 + 0.01
    exact = rows.double().pow(2).sum(dim=1)  # float64 squares: any order is within 1e-12
    row_sums_of_squares = quant.row_sums_of_squares
    assert torch.allclose(row_sums_of_squares(rows), exact, rtol=1e-13, atol=0)
    assert row_sums_of_squares(torch.ones(2, 5)).tolist() == [5.0, 5.0]
    assert row_sums_of_squares(torch.empty(2, 0)).tolist() == [0.0, 0.0]
    assert row_sums_of_squares(torch.ones(0, 4)).shape == (0,)


def test_statistics_do_not_depend_on_the_thread_count(threads):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(2048, 512, generator=gen) * 0.05
    qp = WeightQParams.create(
        qscheme="per_tensor_affine", dtype="quint8", scale=w.abs().max() / 127, zero_point=128
    )
    results = []
    for n in (1, 2, 4):
        torch.set_num_threads(n)
        stats = quantize_and_measure(w, qp, False)[1]
        results.append((stats, sqnr_db(w, w + 1e-3 * torch.sin(w * 1000))))
    assert results[0] == results[1] == results[2]


def test_mse_observer_does_not_depend_on_the_thread_count(threads, monkeypatch):
    monkeypatch.setattr(observers, "MSE_CANDIDATES", 10)
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(64, 4096, generator=gen) * 0.05
    for qscheme in ("per_tensor_affine", "per_channel_affine"):
        spec = QParamSpec("qint8", qscheme, axis=0, observer="mse", percentile=99.9)
        found = []
        for n in (1, 2, 4):
            torch.set_num_threads(n)
            qp = observers.observe(w, spec, "w")
            found.append((qp.scale.tolist(), qp.zero_point.tolist()))
        assert found[0] == found[1] == found[2]


def converted_bytes(
    tmp_path: Path, name: str, sources: list[Path], *options: str, env: dict[str, str]
) -> list[bytes]:
    """Run ``refq convert SOURCES OPTIONS`` into a folder of its own; the bytes of every
    artifact, and of every report without its timing."""
    out = tmp_path / name
    result = run_refq("convert", *sources, *options, "--out-dir", out, env=env)
    assert result.returncode == 0, result.stderr
    found = []
    for path in sorted(out.iterdir()):
        if path.name.endswith(".refq.safetensors"):
            found.append(path.read_bytes())
        elif path.suffix == ".json":
            report = json.loads(path.read_text())
            report["totals"].pop("seconds")
            found.append(json.dumps(report).encode())
    assert len(found) == 2 * len(sources)
    return found


def test_artifact_bytes_do_not_depend_on_the_thread_count(tmp_path):
    source = checkpoint(tmp_path / "m.pt")
    spec = tmp_path / "q.yaml"
    spec.write_text(SPEC.replace("dropout: 0.3", "batch_first: false"))
    outputs = [
        converted_bytes(tmp_path, f"t{n}", [source], "-q", spec, env={"OMP_NUM_THREADS": str(n)})
        for n in (1, 2, 4)
    ]
    assert outputs[0] == outputs[1] == outputs[2]


def test_artifact_bytes_do_not_depend_on_the_worker_count(tmp_path):
    sources = [checkpoint(tmp_path / f"m{seed}.pt", seed) for seed in (0, 1)]
    spec = tmp_path / "q.yaml"
    spec.write_text(SPEC.replace("dropout: 0.3", "batch_first: false"))
    env = {"OMP_NUM_THREADS": "2"}  # --jobs 2 gives each worker half the cores: one thread
    one = converted_bytes(tmp_path, "j1", sources, "-q", spec, "--jobs", "1", env=env)
    two = converted_bytes(tmp_path, "j2", sources, "-q", spec, "--jobs", "2", env=env)
    assert one == two


def test_loaded_modules_are_in_eval_mode_and_verify_repeats_the_report(tmp_path):
    source = checkpoint(tmp_path / "m.pt", layers=2, dropout=0.3)
    spec = tmp_path / "q.yaml"
    spec.write_text(SPEC)
    conversion = convert(source, spec, tmp_path / "a.safetensors")
    artifact = load_artifact(tmp_path / "a.safetensors")
    assert [m.training for m in artifact.modules.values()] == [False]
    x = torch.randn(8, 2, 256)
    with torch.no_grad():
        assert torch.equal(artifact.modules["rnn"](x)[0], artifact.modules["rnn"](x)[0])

    model = Model(2, 0.3).train()
    artifact.apply_to(model)
    assert model.rnn is artifact.modules["rnn"] and not model.rnn.training

    reported = conversion.report["modules"][0]
    first, second = (verify(tmp_path / "a.safetensors", source)["modules"][0] for _ in range(2))
    assert first == second
    for key in ("output_sqnr_db", "output_max_abs_error", "hidden_error_per_step"):
        assert first[key] == reported[key], key
