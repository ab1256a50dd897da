"""Reference modules under torch.export, torch.jit.trace and torch.onnx.export: integer codes
as constants through dequantize ops, the same graph whatever ran before, eager's outputs."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
from torch import nn

from refq_cli import reference
from refq_cli.errors import ExportError
from tests.reference.helpers import tie_heavy_qparams, weight_names

FLOAT = {
    "RNNCell-relu": lambda: nn.RNNCell(5, 6, nonlinearity="relu"),
    "LSTMCell": lambda: nn.LSTMCell(5, 6),
    "GRUCell": lambda: nn.GRUCell(5, 6, bias=False),
    "RNN-bidirectional": lambda: nn.RNN(5, 6, num_layers=2, bidirectional=True),
    "LSTM-batch-first": lambda: nn.LSTM(5, 6, num_layers=2, batch_first=True),
    "LSTM-proj": lambda: nn.LSTM(5, 6, proj_size=3, bidirectional=True),
    "GRU": lambda: nn.GRU(5, 6, num_layers=2),
}
SCHEMES = [("per_channel", "qint8"), ("per_tensor", "quint8"), ("per_channel", "int4")]
DEQUANTIZE = {"dequantize_per_channel", "dequantize_per_tensor"}  # quantized_decomposed's


def int4_qparams(mod: nn.Module) -> dict:
    """Symmetric 4-bit parameters per row of every weight."""
    return {
        name: {
            "qscheme": "per_channel_symmetric",
            "dtype": "int4",
            "scale": getattr(mod, name).detach().abs().amax(dim=1) / 7,
            "axis": 0,
        }
        for name in weight_names(mod)
    }


def make(kind: str, scheme: tuple[str, str] = SCHEMES[0]) -> nn.Module:
    torch.manual_seed(0)
    float_mod = FLOAT[kind]()
    per_channel, dtype = scheme[0] == "per_channel", scheme[1]
    qparams = int4_qparams(float_mod) if dtype == "int4" else None
    qparams = qparams or tie_heavy_qparams(float_mod, per_channel, dtype)
    return reference.REFERENCE_TYPES[type(float_mod)].from_float(float_mod, qparams).eval()


def example(mod: nn.Module) -> torch.Tensor:
    shape = (3, 5) if isinstance(mod, nn.RNNCellBase) else (4, 3, 5)
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1))


def leaves(out) -> list[torch.Tensor]:
    return list(torch.utils._pytree.tree_leaves(out))


def quantized_names(mod: nn.Module) -> list[str]:
    return [n for n in weight_names(mod) if mod.weight_qparams(n) is not None]


@pytest.mark.parametrize("scheme", SCHEMES, ids=["-".join(s) for s in SCHEMES])
@pytest.mark.parametrize("kind", FLOAT)
def test_torch_export_holds_the_integer_codes_and_equals_eager(kind, scheme):
    mod = make(kind, scheme)
    x = example(mod)
    program = torch.export.export(mod, (x,))
    calls = [n for n in program.graph.nodes if n.op == "call_function"]
    dequantized = [
        n
        for n in calls
        if getattr(n.target, "namespace", None) == "quantized_decomposed"
        and n.target._opname in DEQUANTIZE
    ]
    assert len(dequantized) == len(quantized_names(mod))
    integers = [t for t in program.constants.values() if not t.is_floating_point()]
    for name in quantized_names(mod):
        codes = mod.get_quantized_weight(name).codes
        assert sum(t.dtype == codes.dtype and torch.equal(t, codes) for t in integers) == 1
    # the float weights are in the program's state but nothing computes with them
    inputs = {s.arg.name: s.target for s in program.graph_signature.input_specs}
    unused = {inputs[n.name] for n in program.graph.nodes if n.op == "placeholder" and not n.users}
    assert set(quantized_names(mod)) <= unused
    with torch.no_grad():
        got, want = leaves(program.module()(x)), leaves(mod(x))
    assert len(got) == len(want)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


@pytest.mark.parametrize("kind", ["LSTMCell", "LSTM-proj"])
def test_the_graph_is_the_same_before_and_after_the_module_ran(kind):
    mod = make(kind)
    x = example(mod)
    before = torch.export.export(mod, (x,))
    with torch.no_grad():
        mod(x)
        mod(x[..., :3, :] if x.dim() == 3 else x[:2])
    after = torch.export.export(mod, (x,))
    assert str(before.graph) == str(after.graph)
    assert before.constants.keys() == after.constants.keys()
    assert all(torch.equal(before.constants[k], after.constants[k]) for k in before.constants)


@pytest.mark.parametrize("kind", ["GRUCell", "LSTM-batch-first"])
def test_jit_trace_of_a_fresh_module_records_dequantize_and_equals_eager(kind):
    mod = make(kind)
    x = example(mod)
    traced = torch.jit.trace(mod, (x,))  # checks the trace against a second run
    assert "quantized_decomposed::dequantize_per_channel" in str(traced.graph)
    with torch.no_grad():
        assert all(
            torch.equal(a, b) for a, b in zip(leaves(traced(x)), leaves(mod(x)), strict=True)
        )


@pytest.mark.parametrize(
    "change",
    [
        lambda m: setattr(m, "weight_ih", nn.Parameter(torch.randn_like(m.weight_ih))),
        lambda m: m.weight_hh.mul_(0.5),
        lambda m: m.weight_ih_scale.mul_(2),
    ],
    ids=["weight-replaced", "weight-in-place", "scale-in-place"],
)
def test_tracing_refuses_codes_older_than_the_weights(change):
    mod = make("GRUCell")
    x = example(mod)
    with torch.no_grad():
        change(mod)
    with pytest.raises(ExportError, match=r"call refresh_cache\(\)"):
        torch.export.export(mod, (x,))
    with pytest.raises(ExportError, match=r"call refresh_cache\(\)"):
        torch.jit.trace(mod, (x,))
    mod.refresh_cache()
    program = torch.export.export(mod, (x,))
    with torch.no_grad():
        assert torch.equal(program.module()(x), mod(x))


def test_a_module_converted_by_refq_fills_its_codes_on_first_use(tmp_path):
    import refq_cli

    model = nn.Sequential(nn.LSTM(5, 6))
    checkpoint = tmp_path / "m.pt"
    torch.save(model.state_dict(), checkpoint)
    spec = {"version": 1, "defaults": {"dtype": "qint8", "qscheme": "per_channel_symmetric"}}
    conversion = refq_cli.convert(checkpoint, spec, tmp_path / "m.refq.safetensors")
    ref = conversion.modules["0"].reference
    x = torch.randn(4, 2, 5)
    with pytest.raises(ExportError, match=r"call refresh_cache\(\)"):
        torch.export.export(ref, (x,))
    ref.refresh_cache()
    from_conversion = torch.export.export(ref, (x,))
    loaded = refq_cli.load_artifact(conversion.output).modules["0"]  # ready at once
    from_artifact = torch.export.export(loaded, (x,))
    assert str(from_conversion.graph) == str(from_artifact.graph)
    assert all(
        torch.equal(from_conversion.constants[k], from_artifact.constants[k])
        for k in from_conversion.constants
    )


def qint32_cell(scale: float) -> nn.Module:
    float_mod = nn.RNNCell(5, 6)
    qparams = {
        n: {"qscheme": "per_tensor_symmetric", "dtype": "qint32", "scale": scale}
        for n in weight_names(float_mod)
    }
    return reference.RNNCell.from_float(float_mod, qparams)


def test_32_bit_codes_beyond_exact_floats_are_refused():
    with pytest.raises(ExportError, match=r"exceed 16777216 in size"):
        torch.export.export(qint32_cell(1e-9), (torch.randn(2, 5),))


def test_small_32_bit_codes_trace_exactly():
    mod, x = qint32_cell(1e-5), torch.randn(2, 5)
    with torch.no_grad():
        assert torch.equal(torch.export.export(mod, (x,)).module()(x), mod(x))


def test_torch_onnx_export_of_a_model_with_swapped_in_modules_keeps_integer_weights(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")

    class Tagger(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(4, 5, 3, padding=1)
            self.lstm = nn.LSTM(5, 6, batch_first=True, bidirectional=True)
            self.head = nn.Linear(12, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y, _ = self.lstm(self.conv(x).transpose(1, 2))
            return self.head(y)

    model = Tagger().eval()
    qparams = tie_heavy_qparams(model.lstm, True, "qint8")
    model.lstm = reference.LSTM.from_float(model.lstm, qparams).eval()
    x = torch.randn(2, 4, 7)
    path = tmp_path / "tagger.onnx"
    # A dynamic batch; PyTorch's export of aten.lstm fixes the sequence length (it unrolls it
    # while decomposing), for float LSTMs as much as for refq's.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (x,), path, dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},)
        )
    graph = onnx.load(path).graph
    types = {i.name: i.data_type for i in graph.initializer}
    dequantize = [n for n in graph.node if n.op_type == "DequantizeLinear"]
    assert len(dequantize) == len(quantized_names(model.lstm))
    assert all(types[n.input[0]] == onnx.TensorProto.INT8 for n in dequantize)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for shape in [(2, 4, 7), (5, 4, 7)]:
        x = torch.randn(*shape)
        (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            assert float((torch.from_numpy(got) - model(x)).abs().max()) <= 1e-5


@pytest.mark.parametrize(
    "config",
    [
        {"num_layers": 2, "bidirectional": True, "batch_first": True},
        {"num_layers": 2, "bias": False},
        {"bidirectional": True, "bias": False, "batch_first": True},
    ],
    ids=["2-layers-bidirectional-batch-first", "2-layers-no-bias", "bidirectional-no-bias"],
)
def test_an_lstm_with_projections_exports_as_a_loop_with_eagers_outputs(config):
    """aten.lstm with projections is what PyTorch's ONNX exporter cannot lower: export records
    PyTorch's own steps in torch.while_loop instead, the same numbers bit for bit."""
    torch.manual_seed(0)
    float_mod = nn.LSTM(5, 6, proj_size=3, **config).eval()
    mod = reference.LSTM.from_float(float_mod, tie_heavy_qparams(float_mod, True, "qint8"))
    mod.eval()
    x = torch.randn(3, 7, 5) if config.get("batch_first") else torch.randn(7, 3, 5)
    states = mod.num_layers * (1 + mod.bidirectional)
    hx = (torch.randn(states, 3, 3), torch.randn(states, 3, 6))
    steps = torch.export.Dim("steps", min=2)
    time_dim = 1 if config.get("batch_first") else 0
    program = torch.export.export(mod, (x, hx), dynamic_shapes=({time_dim: steps}, (None, None)))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "while_loop" in targets and not any("lstm" in t for t in targets)
    for length in (7, 12):
        x = torch.randn(3, length, 5) if config.get("batch_first") else torch.randn(length, 3, 5)
        with torch.no_grad():
            got, want = leaves(program.module()(x, hx)), leaves(mod(x, hx))
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


@pytest.mark.parametrize(
    "step",
    [
        lambda m: m.to("cpu"),
        lambda m: m.float(),
        lambda m: m.share_memory(),
        lambda m: copy.deepcopy(m),
        lambda m: pickle.loads(pickle.dumps(m)),
    ],
    ids=["to-cpu", "float", "share-memory", "deepcopy", "pickle"],
)
def test_moving_copying_or_pickling_a_module_keeps_it_ready_to_trace(step):
    mod = make("LSTM-batch-first")
    x = example(mod)
    moved = step(mod)
    program = torch.export.export(moved, (x,))
    with torch.no_grad():
        assert all(
            torch.equal(a, b)
            for a, b in zip(leaves(program.module()(x)), leaves(mod(x)), strict=True)
        )


def test_a_module_moved_to_another_dtype_traces_its_new_weights():
    mod = make("GRUCell").double()
    x = example(mod).double()
    with torch.no_grad():
        assert torch.equal(torch.export.export(mod, (x,)).module()(x), mod(x))


def test_codes_cached_under_inference_mode_trace_and_a_changed_path_does_not():
    mod = make("GRUCell")
    x = example(mod)
    with torch.inference_mode():
        mod(x)  # refills the cache under inference mode
    program = torch.export.export(mod, (x,))
    with torch.no_grad():
        assert torch.equal(program.module()(x), mod(x))
    mod.is_decomposed = True  # other numerics: the codes cached are not this path's
    with pytest.raises(ExportError, match=r"call refresh_cache\(\)"):
        torch.export.export(mod, (x,))
