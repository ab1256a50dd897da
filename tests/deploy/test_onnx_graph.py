"""refq_cli.deploy.onnx_graph: ONNX models of reference modules, run by onnxruntime.

Each case of a small matrix (module types, layers, directions, layouts, schemes, dtypes, a
weight kept float) is checked four ways: onnxruntime's outputs against the module's own
forward, the DequantizeLinear outputs bit for bit against the module's fake-quantized weights,
the graph's structure (integer initializers feeding DequantizeLinear nodes, which feed the
recurrent operators directly), and the refusals with their messages.
"""

from __future__ import annotations

import copy
import functools
import subprocess
import sys
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, numpy_helper  # noqa: E402

from refq_cli.deploy import SUPPORTED_OPSETS  # noqa: E402
from refq_cli.deploy.onnx_graph import module_model  # noqa: E402
from refq_cli.errors import ExportError, naming_flags  # noqa: E402
from tests.reference.helpers import REFERENCE_TYPE, tie_heavy_qparams, weight_names  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore:LSTM with projections is not supported with oneDNN:UserWarning"
)
TOLERANCE = 1e-5
# ONNX's gate order as indices of PyTorch's gate blocks, written out here independently.
ONNX_GATES = {"RNN_TANH": [0], "RNN_RELU": [0], "LSTM": [0, 3, 1, 2], "GRU": [1, 0, 2]}
RECURRENT_OPS = ("RNN", "LSTM", "GRU")
INTEGER_TYPES = {TensorProto.INT8, TensorProto.UINT8, TensorProto.INT4, TensorProto.UINT4}
INTEGER_TYPES.add(TensorProto.INT32)
RANGES = {
    "qint8": (-128, 127),
    "quint8": (0, 255),
    "int4": (-8, 7),
    "uint4": (0, 15),
    "qint32": (-(2**31), 2**31 - 1),
}
FLOAT = "float"  # an override that keeps a weight float


# --- building reference modules ---------------------------------------------------------------


def minmax_entry(
    w: torch.Tensor, dtype: str, per_channel: bool, axis: int = 0, zero_point: int | None = None
) -> dict:
    """Affine min/max parameters for ``w`` (qint32: symmetric, ``zero_point`` or 0)."""
    qmin, qmax = RANGES[dtype]
    w = w.detach()
    lo, hi = (w.amin(dim=1 - axis), w.amax(dim=1 - axis)) if per_channel else (w.min(), w.max())
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    if dtype == "qint32":
        scale = torch.maximum(-lo, hi).clamp(min=1e-6) / 2**20
        zp = torch.full_like(scale, zero_point or 0)
    else:
        scale = ((hi - lo) / (qmax - qmin)).clamp(min=1e-6)
        zp = (qmin - lo / scale).round().clamp(qmin, qmax)
    entry = {
        "qscheme": "per_channel_affine" if per_channel else "per_tensor_affine",
        "dtype": dtype,
        "scale": scale if per_channel else float(scale),
        "zero_point": zp.to(torch.int32) if per_channel else int(zp),
    }
    if per_channel:
        entry["axis"] = axis
    return entry


@dataclass(frozen=True)
class Case:
    """A float module and how its weights are quantized: every weight as ``dtype``,
    ``per_channel`` along ``axis``, but for ``overrides`` (a weight name -> keyword arguments
    of :func:`minmax_entry`, or :data:`FLOAT`). ``tie_heavy`` uses the reference tests'
    tie-heavy parameters (axis 0, qint8 or quint8) instead of min/max ones."""

    make: object
    dtype: str = "qint8"
    per_channel: bool = True
    axis: int = 0
    overrides: dict = field(default_factory=dict)
    tie_heavy: bool = False

    def qparams(self, float_mod: nn.Module) -> dict:
        if self.tie_heavy:
            qparams = tie_heavy_qparams(float_mod, self.per_channel, self.dtype)
        else:
            qparams = {
                n: minmax_entry(getattr(float_mod, n), self.dtype, self.per_channel, self.axis)
                for n in weight_names(float_mod)
            }
        for name, override in self.overrides.items():
            w = getattr(float_mod, name)
            qparams[name] = {"qscheme": None} if override == FLOAT else minmax_entry(w, **override)
        return qparams


CASES = {
    "RNNCell-tanh-qint8-tie_heavy": Case(lambda: nn.RNNCell(5, 6), tie_heavy=True),
    "RNNCell-relu-quint8-per_tensor-no_bias": Case(
        lambda: nn.RNNCell(5, 6, bias=False, nonlinearity="relu"), "quint8", per_channel=False
    ),
    "LSTMCell-int4": Case(lambda: nn.LSTMCell(5, 6), "int4"),
    "GRUCell-uint4-per_tensor-axis1": Case(
        lambda: nn.GRUCell(5, 6),
        "uint4",
        per_channel=False,
        overrides={"weight_hh": {"dtype": "uint4", "per_channel": True, "axis": 1}},
    ),
    "RNN-tanh-2_layers-bidirectional": Case(lambda: nn.RNN(5, 6, num_layers=2, bidirectional=True)),
    "RNN-relu-batch_first-quint8-per_tensor": Case(
        lambda: nn.RNN(5, 6, nonlinearity="relu", batch_first=True), "quint8", per_channel=False
    ),
    "LSTM-2_layers-bidirectional-batch_first-axis1": Case(
        lambda: nn.LSTM(5, 6, num_layers=2, bidirectional=True, batch_first=True), axis=1
    ),
    "LSTM-no_bias-int4-per_tensor": Case(
        lambda: nn.LSTM(5, 6, bias=False), "int4", per_channel=False
    ),
    "LSTM-quint8-tie_heavy-float_weight": Case(
        lambda: nn.LSTM(5, 6, num_layers=2),
        "quint8",
        tie_heavy=True,
        overrides={"weight_ih_l1": FLOAT},
    ),
    "LSTM-proj-2_layers-bidirectional": Case(
        lambda: nn.LSTM(5, 6, num_layers=2, bidirectional=True, proj_size=3),
        overrides={
            "weight_hr_l1_reverse": FLOAT,
            "weight_ih_l0": {"dtype": "int4", "per_channel": True},
        },
    ),
    "LSTM-proj-batch_first-no_bias-uint4-axis1": Case(
        lambda: nn.LSTM(5, 6, bias=False, batch_first=True, proj_size=3),
        "uint4",
        overrides={"weight_hr_l0": {"dtype": "quint8", "per_channel": True, "axis": 1}},
    ),
    "GRU-2_layers-bidirectional-quint8-float_weight": Case(
        lambda: nn.GRU(5, 6, num_layers=2, bidirectional=True),
        "quint8",
        overrides={"weight_hh_l1": FLOAT},
    ),
    "GRU-batch_first-qint32": Case(
        lambda: nn.GRU(5, 6, batch_first=True),
        "qint32",
        per_channel=False,
        overrides={"weight_hh_l0": {"dtype": "qint32", "per_channel": True}},
    ),
}


@functools.cache
def reference_module(case_id: str) -> nn.Module:
    torch.manual_seed(sorted(CASES).index(case_id))
    case = CASES[case_id]
    float_mod = case.make()
    return REFERENCE_TYPE[type(float_mod)].from_float(float_mod, case.qparams(float_mod)).eval()


@functools.cache
def exported(case_id: str, initial_states: bool = True) -> onnx.ModelProto:
    return module_model(reference_module(case_id), initial_states=initial_states)


def is_cell(module: nn.Module) -> bool:
    return isinstance(module, nn.RNNCellBase)


def projected(module: nn.Module) -> bool:
    return not is_cell(module) and module.proj_size > 0


def quantized_names(module: nn.Module) -> list[str]:
    return [n for n in weight_names(module) if module.weight_qparams(n) is not None]


def float_names(module: nn.Module) -> list[str]:
    return [n for n in weight_names(module) if module.weight_qparams(n) is None]


# --- running ----------------------------------------------------------------------------------


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def random_inputs(module: nn.Module, steps: int, batch: int, seed: int) -> tuple:
    """``(input, hx)`` for ``module``'s forward: unit-scale random values."""
    gen = torch.Generator().manual_seed(seed)
    hidden = module.hidden_size
    if is_cell(module):
        x = torch.randn(batch, module.input_size, generator=gen)
        h = torch.randn(batch, hidden, generator=gen)
        c = torch.randn(batch, hidden, generator=gen)
    else:
        shape = (batch, steps) if module.batch_first else (steps, batch)
        x = torch.randn(*shape, module.input_size, generator=gen)
        states = module.num_layers * (2 if module.bidirectional else 1)
        h = torch.randn(states, batch, module.proj_size or hidden, generator=gen)
        c = torch.randn(states, batch, hidden, generator=gen)
    return x, ((h, c) if module.mode == "LSTM" else h)


def flatten(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for item in out for t in flatten(item)]


def torch_outputs(module: nn.Module, x: torch.Tensor, hx=None) -> list[np.ndarray]:
    with torch.no_grad():
        out = module(x) if hx is None else module(x, hx)
    return [t.numpy() for t in flatten(out)]


def feeds(module: nn.Module, x: torch.Tensor, hx=None) -> dict:
    result = {"input": x.numpy()}
    if hx is not None:
        h, c = hx if module.mode == "LSTM" else (hx, None)
        result["h_0"] = h.numpy()
        if c is not None:
            result["c_0"] = c.numpy()
    return result


def max_difference(got: list[np.ndarray], expected: list[np.ndarray]) -> float:
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert g.shape == e.shape and g.dtype == np.float32
    return max(float(np.abs(g - e).max()) for g, e in zip(got, expected, strict=True))


def with_dequantized_outputs(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``model`` that also outputs every DequantizeLinear's result."""
    model = copy.deepcopy(model)
    names = [n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"]
    for name in names:
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return model, names


def onnx_layout(module: nn.Module, name: str, values: torch.Tensor) -> torch.Tensor:
    """``values`` of weight ``name`` as the graph holds them: gates in ONNX's order and a
    leading direction axis, except in a projected LSTM's Scan (PyTorch's own 2-D layout)."""
    if projected(module):
        return values
    order = [0] if name.startswith("weight_hr") else ONNX_GATES[module.mode]
    blocks = values.reshape(len(order), -1, values.shape[1])
    return blocks[order].reshape(values.shape).unsqueeze(0)


def producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in graph.node for out in node.output if out}


def initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


# --- 1. onnxruntime computes what the module computes -----------------------------------------


@pytest.mark.parametrize("case_id", list(CASES))
def test_outputs_and_states_match_the_module(case_id):
    module = reference_module(case_id)
    run = session(exported(case_id))
    for seed, (steps, batch) in enumerate([(5, 2), (7, 3)]):
        x, hx = random_inputs(module, steps, batch, seed)
        got = run.run(None, feeds(module, x, hx))
        assert max_difference(got, torch_outputs(module, x, hx)) <= TOLERANCE

    zero_start = session(exported(case_id, initial_states=False))
    assert [i.name for i in zero_start.get_inputs()] == ["input"]
    x, _ = random_inputs(module, 4, 3, 7)
    got = zero_start.run(None, {"input": x.numpy()})
    assert max_difference(got, torch_outputs(module, x)) <= TOLERANCE


@pytest.mark.parametrize(
    "case_id", ["RNNCell-tanh-qint8-tie_heavy", "LSTM-proj-2_layers-bidirectional"]
)
def test_inputs_and_outputs_are_named_and_dynamic(case_id):
    module = reference_module(case_id)
    graph = exported(case_id).graph

    def dims(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    shapes = {v.name: dims(v) for v in [*graph.input, *graph.output]}
    if is_cell(module):
        assert shapes == {"input": ["batch", 5], "h_0": ["batch", 6], "h_1": ["batch", 6]}
    else:
        assert shapes == {
            "input": ["sequence", "batch", 5],
            "h_0": [4, "batch", 3],
            "c_0": [4, "batch", 6],
            "output": ["sequence", "batch", 6],
            "h_n": [4, "batch", 3],
            "c_n": [4, "batch", 6],
        }


def opset_case(opset: int) -> list[nn.Module]:
    torch.manual_seed(opset)
    modules = []
    for float_mod in (
        nn.GRU(5, 6, bidirectional=True, batch_first=True),
        nn.LSTM(5, 6, proj_size=3),
    ):
        dtype = "int4" if opset >= 21 else "qint8"
        qparams = {
            n: minmax_entry(getattr(float_mod, n), dtype, True) for n in weight_names(float_mod)
        }
        modules.append(REFERENCE_TYPE[type(float_mod)].from_float(float_mod, qparams))
    return modules


@pytest.mark.parametrize("opset", list(SUPPORTED_OPSETS))
def test_every_supported_opset_runs(opset):
    for module in opset_case(opset):
        model = module_model(module, opset=opset)
        assert model.opset_import[0].version == opset
        assert model.ir_version == onnx.helper.find_min_ir_version_for(list(model.opset_import))
        x, hx = random_inputs(module, 4, 2, opset)
        got = session(model).run(None, feeds(module, x, hx))
        assert max_difference(got, torch_outputs(module, x, hx)) <= TOLERANCE


# --- 2. the dequantized weights are the module's, bit for bit ---------------------------------


@pytest.mark.parametrize("case_id", list(CASES))
def test_dequantized_weights_are_bit_identical(case_id):
    module = reference_module(case_id)
    model, names = with_dequantized_outputs(exported(case_id))
    x, hx = random_inputs(module, 3, 2, 0)
    values = dict(zip(names, session(model).run(names, feeds(module, x, hx)), strict=True))
    assert sorted(values) == sorted(f"{n}_dequantized" for n in quantized_names(module))
    for name in quantized_names(module):
        expected = onnx_layout(module, name, module.get_weight(name)).numpy()
        got = values[f"{name}_dequantized"]
        assert got.dtype == np.float32 and got.shape == expected.shape
        assert np.array_equal(got.view(np.int32), expected.view(np.int32)), name


# --- 3. integer initializers, DequantizeLinear straight into the operators --------------------


@pytest.mark.parametrize("case_id", list(CASES))
def test_weights_are_integer_initializers_feeding_the_operators(case_id):
    module = reference_module(case_id)
    model = exported(case_id)
    inits = initializers(model)
    made_by = producers(model.graph)
    kept_float = float_names(module)

    dequantize = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dequantize) == len(quantized_names(module))
    for node in dequantize:
        name = node.input[0].removesuffix("_quantized")
        codes = inits[node.input[0]]
        qweight = module.get_quantized_weight(name)
        assert codes.data_type in INTEGER_TYPES
        expected_type = {"int4": TensorProto.INT4, "uint4": TensorProto.UINT4}.get(qweight.dtype)
        if expected_type is not None:
            assert codes.data_type == expected_type
        stored = numpy_helper.to_array(codes).astype(np.int64)
        assert np.array_equal(stored, onnx_layout(module, name, qweight.codes.long()).numpy())
        assert inits[node.input[1]].data_type == TensorProto.FLOAT
        if qweight.dtype == "qint32":
            assert len(node.input) == 2  # DequantizeLinear of int32 has no zero point
        else:
            assert inits[node.input[2]].data_type == codes.data_type
        axes = [a.i for a in node.attribute if a.name == "axis"]
        if qweight.qparams.per_channel:
            offset = 0 if projected(module) else 1
            assert axes == [qweight.qparams.axis % 2 + offset]
        else:
            assert axes == [] and inits[node.input[1]].dims == []

    def weight_source(value: str) -> None:
        """``value``, a weight input of an operator, comes from a DequantizeLinear or is the
        float initializer of a weight kept float."""
        if value in inits:
            assert value in kept_float
        else:
            assert made_by[value].op_type == "DequantizeLinear"

    if projected(module):
        scans = [n for n in model.graph.node if n.op_type == "Scan"]
        assert len(scans) == module.num_layers * (2 if module.bidirectional else 1)
        for scan in scans:
            (body,) = [a.g for a in scan.attribute if a.name == "body"]
            gemms = [n for n in body.node if n.op_type == "Gemm"]
            assert len(gemms) == 3  # input, hidden and projection weights
            for gemm in gemms:
                weight_source(gemm.input[1])
    else:
        ops = [n for n in model.graph.node if n.op_type in RECURRENT_OPS]
        layers = 1 if is_cell(module) else module.num_layers * (2 if module.bidirectional else 1)
        assert len(ops) == layers
        for op in ops:
            weight_source(op.input[1])
            weight_source(op.input[2])

    for name, tensor in inits.items():
        if tensor.data_type != TensorProto.FLOAT:
            continue
        assert name.endswith("_scale") or name.startswith("bias") or name in kept_float, name
    for name in kept_float:
        expected = onnx_layout(module, name, getattr(module, name).detach()).numpy()
        assert np.array_equal(numpy_helper.to_array(inits[name]), expected)


def test_export_package_imports_neither_torch_nor_onnx():
    code = (
        "import sys, refq_cli.deploy; "
        "loaded = {'torch', 'onnx'} & set(sys.modules); assert not loaded, sorted(loaded)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- 4. refusals --------------------------------------------------------------------------------


def small(float_mod: nn.Module, dtype: str = "qint8", **entry) -> nn.Module:
    qparams = {
        n: minmax_entry(getattr(float_mod, n), dtype, **{"per_channel": True, **entry})
        for n in weight_names(float_mod)
    }
    return REFERENCE_TYPE[type(float_mod)].from_float(float_mod, qparams)


def test_refuses_opsets_without_per_axis_dequantize_or_newer_than_supported():
    module = small(nn.GRUCell(5, 6))
    for opset in (12, SUPPORTED_OPSETS[-1] + 1, "21", True):
        with pytest.raises(ExportError, match=r"opset=.*: refq writes ONNX opsets 13 to 23"):
            module_model(module, opset=opset)


def test_refuses_four_bit_weights_below_opset_21():
    module = small(nn.LSTM(5, 6), "uint4")
    with pytest.raises(
        ExportError,
        match=r"LSTM\.weight_ih_l0: 4-bit weights need opset=21 or later \(this one is uint4",
    ):
        module_model(module, opset=20)
    with naming_flags(), pytest.raises(ExportError, match="need --opset 21 or later"):
        module_model(module, opset=19)
    assert module_model(module, opset=21).opset_import[0].version == 21


def test_refuses_qint32_weights_with_a_nonzero_zero_point():
    float_mod = nn.RNNCell(5, 6)
    qparams = {
        "weight_ih": minmax_entry(float_mod.weight_ih, "qint32", False),
        "weight_hh": minmax_entry(float_mod.weight_hh, "qint32", False, zero_point=5),
    }
    module = REFERENCE_TYPE[nn.RNNCell].from_float(float_mod, qparams)
    with pytest.raises(ExportError, match=r"RNNCell\.weight_hh: .*int32 takes no zero point"):
        module_model(module)


def test_a_float16_module_exports_its_integer_weights_computing_in_float32():
    module = small(nn.GRU(5, 6)).half()
    model = module_model(module)
    x, h = torch.randn(4, 2, 5), torch.randn(1, 2, 6)
    got = session(model).run(None, {"input": x.numpy(), "h_0": h.numpy()})
    with torch.no_grad():
        want = module(x.half(), h.half())
    for a, b in zip(got, want, strict=True):
        assert float((torch.from_numpy(a) - b.float()).abs().max()) < 5e-3  # float16's rounding
    codes = {i.name: i for i in model.graph.initializer}["weight_ih_l0_quantized"]
    assert codes.data_type == onnx.TensorProto.INT8


@pytest.mark.parametrize("module", [nn.LSTM(5, 6), nn.Linear(5, 6)], ids=["float_LSTM", "Linear"])
def test_refuses_modules_it_does_not_know(module):
    with pytest.raises(ExportError, match=r"takes refq's reference modules.*convert the model"):
        module_model(module)
