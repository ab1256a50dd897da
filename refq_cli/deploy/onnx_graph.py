"""ONNX models of refq reference modules, with integer weights and DequantizeLinear nodes.

:func:`module_model` builds the graph of one reference module (``refq_cli.reference``'s
RNNCell, LSTMCell, GRUCell, RNN, LSTM, GRU) directly with ``onnx.helper``: each quantized weight
becomes an integer initializer (its codes, INT8, UINT8, INT32, INT4 or UINT4) with its scale
and zero point, dequantized by a ``DequantizeLinear`` node; a weight kept float is a float
initializer. The model computes what the module computes in inference (no dropout).

Layout of the graph:

* one ONNX ``RNN`` / ``LSTM`` / ``GRU`` node per layer and direction (``direction`` forward or
  reverse, one direction each), whose ``W`` and ``R`` inputs are DequantizeLinear outputs, the
  pattern integer backends fuse; their gate rows, with the per-row scales and zero points and
  the biases, are reordered from PyTorch's order to ONNX's on the integer codes (LSTM i,f,g,o
  to i,o,f,c; GRU r,z,n to z,r,h with ``linear_before_reset=1``);
* an LSTM with ``proj_size > 0``, which ONNX's LSTM cannot express, is a ``Scan`` per layer and
  direction whose body computes PyTorch's step (gates in PyTorch's order, then the projection);
  the DequantizeLinear nodes stay in the outer graph, in the weights' own 2-D layout.

Inputs and outputs are named and laid out as PyTorch's ``forward`` takes and returns them:
``input`` (+ ``h_0``, ``c_0``) and ``output``, ``h_n`` (+ ``c_n``) for sequence modules,
``input`` (+ ``h_0``, ``c_0``) and ``h_1`` (+ ``c_1``) for cells, with dynamic ``batch`` and
``sequence`` dimensions. Only batched inputs: ``[sequence, batch, features]`` (``[batch,
sequence, features]`` with ``batch_first``) and ``[batch, features]`` for cells; no
PackedSequence. Initializers and nodes are named after the PyTorch weights they come from
(``weight_ih_l0_reverse_quantized``, ``weight_ih_l0_reverse_scale``, ...).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from refq_cli import __version__
from refq_cli.deploy import DEFAULT_OPSET, FOUR_BIT_OPSET, check_opset
from refq_cli.errors import ExportError, argument
from refq_cli.quant.numerics import QuantizedWeight

if TYPE_CHECKING:
    import onnx

__all__ = ["module_model"]


_MODES = ("RNN_TANH", "RNN_RELU", "LSTM", "GRU")
_ONNX_OP = {"RNN_TANH": "RNN", "RNN_RELU": "RNN", "LSTM": "LSTM", "GRU": "GRU"}
# ONNX's gate order, as indices of PyTorch's gate blocks (rows of weight_ih / weight_hh).
GATE_ORDER = {
    "RNN_TANH": (0,),
    "RNN_RELU": (0,),
    "LSTM": (0, 3, 1, 2),  # PyTorch i, f, g, o -> ONNX i, o, f, c
    "GRU": (1, 0, 2),  # PyTorch r, z, n -> ONNX z, r, h
}
_FOUR_BIT = ("int4", "uint4")
_BATCH, _SEQUENCE = "batch", "sequence"


def _onnx() -> Any:
    """The onnx package, or ExportError saying how to install it."""
    try:
        import onnx
    except ImportError:
        raise ExportError("ONNX export needs the onnx package: pip install 'refq[onnx]'") from None
    return onnx


def module_model(
    module: torch.nn.Module,
    *,
    opset: int = DEFAULT_OPSET,
    initial_states: bool = True,
    name: str = "refq",
) -> onnx.ModelProto:
    """An ONNX model computing ``module``'s forward, with its weights as integer codes.

    ``module`` is one of refq's reference modules (``refq_cli.reference``), in inference
    (dropout is not exported); the model computes in float32 whatever the module's float dtype,
    with the same integer weights. With ``initial_states`` the model takes ``h_0`` (and
    ``c_0`` for LSTMs) as PyTorch's ``forward`` takes ``hx``; without, the states start at
    zero. ``name`` names the graph. The model passes onnx's full checker and strict shape
    inference before it is returned.

    Raises ExportError for an opset outside :data:`refq_cli.deploy.SUPPORTED_OPSETS` (or newer
    than the installed onnx), 4-bit weights below opset 21, qint32 weights with a nonzero zero
    point, a module on the meta device, and a module type this exporter does not know.
    """
    onnx = _onnx()
    _check_module(module)
    _check_opset(module, opset, onnx)
    builder = _GraphBuilder(onnx, module, opset)
    if isinstance(module, torch.nn.RNNCellBase):
        inputs, outputs = _cell_graph(builder, module, initial_states)
    else:
        inputs, outputs = _sequence_graph(builder, module, initial_states)
    graph = onnx.helper.make_graph(
        builder.nodes,
        name,
        inputs,
        outputs,
        builder.initializers,
        doc_string=f"refq reference-quantized {type(module).__name__}",
    )
    opsets = [onnx.helper.make_opsetid("", opset)]
    model = onnx.helper.make_model(
        graph,
        opset_imports=opsets,
        ir_version=onnx.helper.find_min_ir_version_for(opsets),
        producer_name="refq",
        producer_version=__version__,
    )
    _validate(onnx, model, module)
    return model


# --- checks ---------------------------------------------------------------------------------


def _kind(module: torch.nn.Module) -> str:
    return type(module).__name__


def _check_module(module: torch.nn.Module) -> None:
    from refq_cli.reference import RNNBase, RNNCellBase

    if not isinstance(module, (RNNBase, RNNCellBase)) or module.mode not in _MODES:
        raise ExportError(
            f"cannot export {type(module).__module__}.{_kind(module)} to ONNX: export takes "
            "refq's reference modules (RNNCell, LSTMCell, GRUCell, RNN, LSTM, GRU); convert "
            "the model with refq first"
        )
    if any(p.is_meta for p in module.parameters()):
        raise ExportError(f"{_kind(module)}: its tensors are on the meta device, holding no data")


def _check_opset(module: torch.nn.Module, opset: int, onnx: Any) -> None:
    check_opset(opset)
    newest = onnx.defs.onnx_opset_version()
    if opset > newest:
        raise ExportError(
            f"{_kind(module)}: opset {opset} is newer than onnx {onnx.__version__} knows "
            f"(newest {newest}); use {argument('opset', newest)} or upgrade onnx"
        )


def _check_weight(module: torch.nn.Module, name: str, weight: QuantizedWeight, opset: int) -> None:
    qp = weight.qparams
    where = f"{_kind(module)}.{name}"
    if qp.dtype in _FOUR_BIT and opset < FOUR_BIT_OPSET:
        raise ExportError(
            f"{where}: 4-bit weights need {argument('opset', FOUR_BIT_OPSET)} or later "
            f"(this one is {qp.dtype}, the opset {opset})"
        )
    if qp.dtype == "qint32" and bool((qp.zero_point != 0).any()):
        raise ExportError(
            f"{where}: ONNX's DequantizeLinear of int32 takes no zero point, and this qint32 "
            "weight's is nonzero; quantize it with zero point 0 (a symmetric qscheme) or to qint8"
        )


def _validate(onnx: Any, model: Any, module: torch.nn.Module) -> None:
    try:
        onnx.checker.check_model(model, full_check=True)
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(
            f"{_kind(module)}: the ONNX model refq built fails onnx's checks ({first}); "
            "this is a bug in refq, please report it"
        ) from exc


# --- graph building -------------------------------------------------------------------------

# refq's integer dtypes -> the TensorProto types of their codes (4-bit ones packed two a byte)
_ELEMENT_TYPES = {
    "qint8": "INT8",
    "quint8": "UINT8",
    "qint32": "INT32",
    "int4": "INT4",
    "uint4": "UINT4",
}


@dataclass(frozen=True)
class _Weight:
    """Where a weight's float values come from in the graph: a DequantizeLinear output
    (``quantized``) or a float initializer."""

    value: str
    quantized: bool


class _GraphBuilder:
    """Collects the nodes and initializers of one graph (or Scan body), with unique names."""

    def __init__(self, onnx: Any, module: torch.nn.Module, opset: int) -> None:
        self.onnx = onnx
        self.helper = onnx.helper
        self.module = module
        self.opset = opset
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self._constants: dict[tuple[str, tuple[int, ...], bool], str] = {}

    def node(self, op: str, inputs: Sequence[str], outputs: Sequence[str], **attrs: Any) -> Any:
        """Add node ``op`` named after its first named output; returns the node."""
        label = next(o for o in outputs if o)
        node = self.helper.make_node(op, list(inputs), list(outputs), name=f"{op}_{label}", **attrs)
        self.nodes.append(node)
        return node

    def initializer(self, tensor: Any, doc: str = "") -> str:
        if doc:
            tensor.doc_string = doc
        self.initializers.append(tensor)
        return tensor.name

    def float_initializer(self, name: str, values: torch.Tensor, doc: str = "") -> str:
        array = values.detach().cpu().to(torch.float32).contiguous().numpy()
        return self.initializer(self.onnx.numpy_helper.from_array(array, name), doc)

    def int64s(self, values: Sequence[int], *, scalar: bool = False) -> str:
        """A shared int64 constant (axes, indices, sizes): 1-D, or 0-d with ``scalar``."""
        key = ("int64", tuple(values), scalar)
        if key not in self._constants:
            label = "_".join(str(v) for v in values)
            name = f"const_{'scalar' if scalar else 'int64s'}_{label}"
            tensor = self.helper.make_tensor(
                name, self.onnx.TensorProto.INT64, [] if scalar else [len(values)], list(values)
            )
            self._constants[key] = self.initializer(tensor)
        return self._constants[key]

    def squeeze(self, value: str, axis: int, out: str) -> str:
        self.node("Squeeze", [value, self.int64s([axis])], [out])
        return out

    def unsqueeze(self, value: str, axis: int, out: str) -> str:
        self.node("Unsqueeze", [value, self.int64s([axis])], [out])
        return out

    def join(self, values: Sequence[str], axis: int, out: str) -> str:
        """``values`` concatenated on ``axis`` (the one value itself, renamed, if alone)."""
        if len(values) == 1:
            self.node("Identity", values, [out])
        else:
            self.node("Concat", values, [out], axis=axis)
        return out

    def value_info(self, name: str, shape: Sequence[int | str]) -> Any:
        return self.helper.make_tensor_value_info(name, self.onnx.TensorProto.FLOAT, list(shape))

    # --- weights

    def weight(self, name: str, gate_order: Sequence[int], *, stacked: bool) -> _Weight:
        """Weight ``name`` with its gate blocks in ``gate_order``: the output of a
        DequantizeLinear of its integer codes, or a float initializer if it is kept float.

        ``stacked`` gives it the leading direction axis of the ONNX ops' ``W`` and ``R``
        (``[1, gates * hidden, columns]``); otherwise it keeps PyTorch's 2-D layout.
        """
        source = self.module.get_quantized_weight(name)
        if not isinstance(source, QuantizedWeight):
            values = _reordered(source.detach(), gate_order)
            if stacked:
                values = values.unsqueeze(0)
            doc = f"{name}, kept float" + (", gates in ONNX order" if len(gate_order) > 1 else "")
            return _Weight(self.float_initializer(name, values, doc), quantized=False)
        _check_weight(self.module, name, source, self.opset)
        qp = source.qparams
        codes = _reordered(source.codes.detach().cpu(), gate_order)
        scale = qp.scale.detach().cpu().to(torch.float32)
        zero_point = qp.zero_point.detach().cpu()
        attrs: dict[str, int] = {}
        if qp.per_channel:
            axis = qp.axis % codes.dim()
            if axis == 0:  # one scale per row: the rows' scales move with them
                scale = _reordered(scale, gate_order)
                zero_point = _reordered(zero_point, gate_order)
            attrs["axis"] = axis + 1 if stacked else axis
        if stacked:
            codes = codes.unsqueeze(0)
        element = getattr(self.onnx.TensorProto, _ELEMENT_TYPES[qp.dtype])
        reorder = " (gates in ONNX order)" if len(gate_order) > 1 else ""
        inputs = [
            self.initializer(
                self._integer_tensor(f"{name}_quantized", codes, element),
                f"{name}: {qp.dtype} codes{reorder}",
            ),
            self.float_initializer(f"{name}_scale", scale, f"{name}: {qp.qscheme} scale"),
        ]
        if qp.dtype != "qint32":  # DequantizeLinear of int32 takes no zero point (it is 0)
            inputs.append(
                self.initializer(
                    self._integer_tensor(f"{name}_zero_point", zero_point, element),
                    f"{name}: zero point",
                )
            )
        out = f"{name}_dequantized"
        node = self.node("DequantizeLinear", inputs, [out], **attrs)
        node.name = f"{name}_DequantizeLinear"
        return _Weight(out, quantized=True)

    def _integer_tensor(self, name: str, values: torch.Tensor, element: int) -> Any:
        """An initializer of ONNX integer type ``element`` holding ``values``, which fit it."""
        array = values.contiguous().numpy()
        if element in (self.onnx.TensorProto.INT4, self.onnx.TensorProto.UINT4):
            # make_tensor packs 4-bit values two to a byte
            return self.helper.make_tensor(name, element, list(array.shape), array.reshape(-1))
        array = array.astype(self.helper.tensor_dtype_to_np_dtype(element), copy=False)
        return self.onnx.numpy_helper.from_array(array, name)

    def bias(self, suffix: str, gate_order: Sequence[int]) -> str:
        """ONNX's ``B``: ``bias_ih`` then ``bias_hh``, gates reordered, ``[1, 2 * rows]``."""
        ih, hh = f"bias_ih{suffix}", f"bias_hh{suffix}"
        parts = [_reordered(getattr(self.module, n).detach(), gate_order) for n in (ih, hh)]
        values = torch.cat(parts).unsqueeze(0)
        return self.float_initializer(
            f"bias{suffix}", values, f"concat({ih}, {hh}), gates in ONNX order"
        )


def _reordered(t: torch.Tensor, gate_order: Sequence[int]) -> torch.Tensor:
    """``t`` with its gate blocks (equal slices of dim 0) in ``gate_order``."""
    if list(gate_order) == list(range(len(gate_order))):
        return t
    blocks = t.reshape(len(gate_order), -1, *t.shape[1:])
    return blocks[list(gate_order)].reshape(t.shape)


# --- ONNX recurrent operators -----------------------------------------------------------------


@dataclass(frozen=True)
class _Step:
    """One recurrent operator: a layer and direction of the module (or a cell)."""

    suffix: str  # PyTorch's suffix of the weight names: "_l1_reverse", "" for a cell
    reverse: bool
    x: str  # its input sequence, [sequence, batch, features]
    initial_h: str | None  # [1, batch, hidden] or None for zeros
    initial_c: str | None


def _recurrent_op(
    builder: _GraphBuilder, step: _Step, *, want_y: bool
) -> tuple[str | None, str, str | None]:
    """One ONNX RNN / LSTM / GRU node; its ``Y`` (``[sequence, 1, batch, hidden]``, when
    ``want_y``), ``Y_h`` and, for an LSTM, ``Y_c`` (``[1, batch, hidden]``)."""
    module = builder.module
    mode = module.mode
    order = GATE_ORDER[mode]
    w = builder.weight(f"weight_ih{step.suffix}", order, stacked=True)
    r = builder.weight(f"weight_hh{step.suffix}", order, stacked=True)
    inputs = [step.x, w.value, r.value]
    inputs.append(builder.bias(step.suffix, order) if module.bias else "")
    inputs += ["", step.initial_h or ""]  # no sequence_lens: every sequence is full length
    is_lstm = mode == "LSTM"
    if is_lstm:
        inputs.append(step.initial_c or "")
    while inputs[-1] == "":
        inputs.pop()
    op = _ONNX_OP[mode]
    y = f"Y{step.suffix}" if want_y else None
    y_h, y_c = f"Y_h{step.suffix}", (f"Y_c{step.suffix}" if is_lstm else None)
    outputs = [y or "", y_h] + ([y_c] if is_lstm else [])
    attrs: dict[str, Any] = {
        "hidden_size": module.hidden_size,
        "direction": "reverse" if step.reverse else "forward",
    }
    if mode == "GRU":
        attrs["linear_before_reset"] = 1
    elif op == "RNN":
        attrs["activations"] = ["Relu" if mode == "RNN_RELU" else "Tanh"]
    node = builder.node(op, inputs, outputs, **attrs)
    node.name = f"{op}{step.suffix}"
    return y, y_h, y_c


def _projected_lstm_scan(
    builder: _GraphBuilder, step: _Step, h0: str, c0: str
) -> tuple[str, str, str]:
    """An LSTM layer-direction with ``proj_size``, as a Scan over PyTorch's step.

    ``h0`` ``[batch, proj]`` and ``c0`` ``[batch, hidden]`` start it; returns its output
    ``[sequence, batch, proj]`` and final ``h`` and ``c`` (``[batch, proj]``, ``[batch, hidden]``).
    The body reads the dequantized weights, biases and split sizes from the outer graph.
    """
    module = builder.module
    hidden, proj = module.hidden_size, module.proj_size
    s = step.suffix
    identity = (0, 1, 2, 3)  # inside the body the gates stay in PyTorch's order
    w_ih = builder.weight(f"weight_ih{s}", identity, stacked=False).value
    w_hh = builder.weight(f"weight_hh{s}", identity, stacked=False).value
    w_hr = builder.weight(f"weight_hr{s}", (0,), stacked=False).value
    b_ih = b_hh = None
    if module.bias:
        b_ih = builder.float_initializer(f"bias_ih{s}", getattr(module, f"bias_ih{s}"))
        b_hh = builder.float_initializer(f"bias_hh{s}", getattr(module, f"bias_hh{s}"))
    split = builder.int64s([hidden] * 4)

    body = _GraphBuilder(builder.onnx, module, builder.opset)
    p = f"scan{s}_"  # body names must not shadow the outer graph's
    h_prev, c_prev, x_t = f"{p}h_prev", f"{p}c_prev", f"{p}x_t"

    def v(label: str) -> str:
        return p + label

    body.node("Gemm", [x_t, w_ih] + ([b_ih] if b_ih else []), [v("gates_x")], transB=1)
    body.node("Gemm", [h_prev, w_hh] + ([b_hh] if b_hh else []), [v("gates_h")], transB=1)
    body.node("Add", [v("gates_x"), v("gates_h")], [v("gates")])
    gates = [v("i"), v("f"), v("g"), v("o")]
    body.node("Split", [v("gates"), split], gates, axis=1)
    body.node("Sigmoid", [v("i")], [v("input_gate")])
    body.node("Sigmoid", [v("f")], [v("forget_gate")])
    body.node("Tanh", [v("g")], [v("cell_gate")])
    body.node("Sigmoid", [v("o")], [v("output_gate")])
    body.node("Mul", [v("forget_gate"), c_prev], [v("kept")])
    body.node("Mul", [v("input_gate"), v("cell_gate")], [v("added")])
    body.node("Add", [v("kept"), v("added")], [v("c_next")])
    body.node("Tanh", [v("c_next")], [v("c_tanh")])
    body.node("Mul", [v("output_gate"), v("c_tanh")], [v("h_full")])
    body.node("Gemm", [v("h_full"), w_hr], [v("h_next")], transB=1)
    body.node("Identity", [v("h_next")], [v("y_t")])
    graph = builder.helper.make_graph(
        body.nodes,
        f"lstm{s}_step",
        [
            body.value_info(h_prev, [_BATCH, proj]),
            body.value_info(c_prev, [_BATCH, hidden]),
            body.value_info(x_t, [_BATCH, _layer_input_size(module, s)]),
        ],
        [
            body.value_info(v("h_next"), [_BATCH, proj]),
            body.value_info(v("c_next"), [_BATCH, hidden]),
            body.value_info(v("y_t"), [_BATCH, proj]),
        ],
        doc_string=f"one step of PyTorch's LSTM{s} with projection",
    )
    direction = [1 if step.reverse else 0]
    h_n, c_n, y = f"Scan_h{s}", f"Scan_c{s}", f"Y{s}"
    node = builder.node(
        "Scan",
        [h0, c0, step.x],
        [h_n, c_n, y],
        body=graph,
        num_scan_inputs=1,
        scan_input_directions=direction,
        scan_output_directions=direction,
    )
    node.name = f"Scan{s}"
    return y, h_n, c_n


def _layer_input_size(module: torch.nn.Module, suffix: str) -> int:
    """Features of the input of the layer whose weights end with ``suffix``."""
    layer = int(suffix.removeprefix("_l").removesuffix("_reverse"))
    if layer == 0:
        return module.input_size
    width = module.proj_size if module.proj_size > 0 else module.hidden_size
    return width * (2 if module.bidirectional else 1)


# --- whole modules --------------------------------------------------------------------------


def _cell_graph(
    builder: _GraphBuilder, module: torch.nn.Module, initial_states: bool
) -> tuple[list[Any], list[Any]]:
    """A cell: its input as a one-step sequence through one ONNX operator."""
    is_lstm = module.mode == "LSTM"
    hidden = module.hidden_size
    inputs = [builder.value_info("input", [_BATCH, module.input_size])]
    outputs = [builder.value_info("h_1", [_BATCH, hidden])]
    if is_lstm:
        outputs.append(builder.value_info("c_1", [_BATCH, hidden]))
    initial_h = initial_c = None
    if initial_states:
        inputs.append(builder.value_info("h_0", [_BATCH, hidden]))
        initial_h = builder.unsqueeze("h_0", 0, "h_0_stacked")
        if is_lstm:
            inputs.append(builder.value_info("c_0", [_BATCH, hidden]))
            initial_c = builder.unsqueeze("c_0", 0, "c_0_stacked")
    x = builder.unsqueeze("input", 0, "input_sequence")
    _, y_h, y_c = _recurrent_op(builder, _Step("", False, x, initial_h, initial_c), want_y=False)
    builder.squeeze(y_h, 0, "h_1")
    if y_c is not None:
        builder.squeeze(y_c, 0, "c_1")
    return inputs, outputs


def _sequence_graph(
    builder: _GraphBuilder, module: torch.nn.Module, initial_states: bool
) -> tuple[list[Any], list[Any]]:
    """A sequence module: layers of one operator (or Scan) per direction, chained."""
    is_lstm = module.mode == "LSTM"
    projected = is_lstm and module.proj_size > 0
    directions = 2 if module.bidirectional else 1
    hidden = module.hidden_size
    h_out = module.proj_size if projected else hidden
    states = module.num_layers * directions
    time_major = [_SEQUENCE, _BATCH]
    layout = [_BATCH, _SEQUENCE] if module.batch_first else time_major

    inputs = [builder.value_info("input", [*layout, module.input_size])]
    if initial_states:
        inputs.append(builder.value_info("h_0", [states, _BATCH, h_out]))
        if is_lstm:
            inputs.append(builder.value_info("c_0", [states, _BATCH, hidden]))
    outputs = [
        builder.value_info("output", [*layout, directions * h_out]),
        builder.value_info("h_n", [states, _BATCH, h_out]),
    ]
    if is_lstm:
        outputs.append(builder.value_info("c_n", [states, _BATCH, hidden]))

    x = "input"
    if module.batch_first:
        x = "input_time_major"
        builder.node("Transpose", ["input"], [x], perm=[1, 0, 2])
    zeros = _zero_states(builder, x, h_out, hidden) if projected and not initial_states else None

    final_h: list[str] = []
    final_c: list[str] = []
    for layer in range(module.num_layers):
        ys = []
        for d in range(directions):
            suffix = f"_l{layer}" + ("_reverse" if d else "")
            index = layer * directions + d
            if projected:
                y, y_h, y_c = _projected_step(builder, suffix, d == 1, x, index, zeros)
            else:
                step = _Step(
                    suffix,
                    d == 1,
                    x,
                    _state_slice(builder, "h_0", index, keep=True) if initial_states else None,
                    _state_slice(builder, "c_0", index, keep=True)
                    if initial_states and is_lstm
                    else None,
                )
                y4, y_h, y_c = _recurrent_op(builder, step, want_y=True)
                assert y4 is not None
                y = builder.squeeze(y4, 1, f"output{suffix}" + ("" if d else "_forward"))
            ys.append(y)
            final_h.append(y_h)
            if y_c is not None:
                final_c.append(y_c)
        last = layer == module.num_layers - 1
        name = "output" if last and not module.batch_first else f"output_l{layer}"
        x = builder.join(ys, 2, name)
    if module.batch_first:
        builder.node("Transpose", [x], ["output"], perm=[1, 0, 2])
    builder.join(final_h, 0, "h_n")
    if is_lstm:
        builder.join(final_c, 0, "c_n")
    return inputs, outputs


def _state_slice(builder: _GraphBuilder, state: str, index: int, *, keep: bool) -> str:
    """Entry ``index`` of ``h_0`` or ``c_0``: ``[1, batch, size]`` with ``keep``, else
    ``[batch, size]``."""
    out = f"{state}_{index}"
    builder.node("Gather", [state, builder.int64s([index], scalar=not keep)], [out], axis=0)
    return out


def _zero_states(builder: _GraphBuilder, x: str, h_out: int, hidden: int) -> tuple[str, str]:
    """Zero ``[batch, h_out]`` and ``[batch, hidden]`` states, sized by the input ``x``."""
    builder.node("Shape", [x], ["input_shape"])
    builder.node("Slice", ["input_shape", builder.int64s([1]), builder.int64s([2])], ["batch_size"])
    zero = builder.helper.make_tensor("value", builder.onnx.TensorProto.FLOAT, [1], [0.0])
    names = []
    for label, size in (("h", h_out), ("c", hidden)):
        shape = f"zero_{label}_shape"
        builder.node("Concat", ["batch_size", builder.int64s([size])], [shape], axis=0)
        names.append(f"zero_{label}")
        builder.node("ConstantOfShape", [shape], [names[-1]], value=zero)
    return names[0], names[1]


def _projected_step(
    builder: _GraphBuilder,
    suffix: str,
    reverse: bool,
    x: str,
    index: int,
    zeros: tuple[str, str] | None,
) -> tuple[str, str, str]:
    """A Scan for one layer-direction of a projected LSTM; output ``[sequence, batch, proj]``
    and final states ``[1, batch, size]``."""
    if zeros is None:
        h0 = _state_slice(builder, "h_0", index, keep=False)
        c0 = _state_slice(builder, "c_0", index, keep=False)
    else:
        h0, c0 = zeros
    step = _Step(suffix, reverse, x, None, None)
    y, h_n, c_n = _projected_lstm_scan(builder, step, h0, c0)
    return (
        y,
        builder.unsqueeze(h_n, 0, f"Y_h{suffix}"),
        builder.unsqueeze(c_n, 0, f"Y_c{suffix}"),
    )
