"""What refq converts, and to what: the one table of module kinds and quantization kinds that
every stage reads (checkpoint discovery, the TorchScript reader, the spec, the artifact's
metadata checks, conversion, verify and init-config).

Adding a recurrent module type is a row of :data:`KINDS` (and its reference module and
converter); adding a constructor argument is a row of :data:`ARGUMENTS`; a fact (an argument
that weights cannot tell) is an argument with ``fact=True``. Plain Python: importing this does not
import torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ROOT = "<root>"  # how specs, reports, messages and calibration files name a module at the root


def display_path(path: str) -> str:
    """A module path as refq names it everywhere (specs, calibration files, reports, JSON
    output, messages, ``Artifact.modules``): ``<root>`` for the root module, whose path in
    PyTorch (``named_modules()``) and in the artifact's metadata is ``""``."""
    return path or ROOT


def module_path(name: str) -> str:
    """The PyTorch path of the module refq names ``name``: ``""`` for ``<root>``."""
    return "" if name == ROOT else name


def tensor_key(path: str, name: str) -> str:
    """The checkpoint and artifact key of tensor ``name`` of the module at ``path`` (its PyTorch
    path or refq's name for it)."""
    path = module_path(path)
    return f"{path}.{name}" if path else name


# --- recurrent module kinds -------------------------------------------------------------------

_REQUIRED = object()


@dataclass(frozen=True)
class Argument:
    """A constructor argument of ``torch.nn``'s recurrent modules."""

    name: str
    type: type  # what torch.nn stores: int, bool, float or str
    check: str | tuple[str, ...]  # metadata value kind (io.header), or the allowed values
    default: Any = _REQUIRED  # PyTorch's default
    fact: bool = False  # weights cannot tell it: a file's module, the spec, or the default
    description: str = ""  # for the spec's JSON Schema (facts)

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED


ARGUMENTS: dict[str, Argument] = {
    a.name: a
    for a in (
        Argument("input_size", int, "count"),
        Argument("hidden_size", int, "size"),
        Argument("num_layers", int, "size", 1),
        Argument(
            "nonlinearity",
            str,
            ("tanh", "relu"),
            "tanh",
            fact=True,
            description="RNN and RNNCell nonlinearity.",
        ),
        Argument("bias", bool, "bool", True),
        Argument(
            "batch_first",
            bool,
            "bool",
            False,
            fact=True,
            description="Whether inputs are (batch, time, features).",
        ),
        Argument(
            "dropout",
            float,
            "fraction",
            0.0,
            fact=True,
            description="Dropout between layers (only active in training).",
        ),
        Argument("bidirectional", bool, "bool", False),
        Argument("proj_size", int, "count", 0),
    )
}


@dataclass(frozen=True)
class ModuleKind:
    """A recurrent ``torch.nn`` module type refq converts."""

    name: str  # the torch.nn class name, as artifacts record it
    gates: int  # rows of weight_hh per hidden unit
    cell: bool  # one step (RNNCell) or a whole sequence of layers (RNN)
    arguments: tuple[str, ...]  # constructor arguments, in torch.nn's order

    @property
    def facts(self) -> tuple[str, ...]:
        """The arguments weights cannot tell."""
        return tuple(a for a in self.arguments if ARGUMENTS[a].fact)


_CELL = ("input_size", "hidden_size", "bias")
_SEQUENCE = ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout")
KINDS: dict[str, ModuleKind] = {
    k.name: k
    for k in (
        ModuleKind("RNNCell", 1, True, (*_CELL, "nonlinearity")),
        ModuleKind("LSTMCell", 4, True, _CELL),
        ModuleKind("GRUCell", 3, True, _CELL),
        ModuleKind(
            "RNN", 1, False, (*_SEQUENCE[:3], "nonlinearity", *_SEQUENCE[3:], "bidirectional")
        ),
        ModuleKind("LSTM", 4, False, (*_SEQUENCE, "bidirectional", "proj_size")),
        ModuleKind("GRU", 3, False, (*_SEQUENCE, "bidirectional")),
    )
}
FACTS: dict[str, Argument] = {a.name: a for a in ARGUMENTS.values() if a.fact}


def kind_with(gates: int, cell: bool) -> ModuleKind | None:
    """The kind with ``gates`` gates, a cell or not; None when there is none."""
    return next((k for k in KINDS.values() if k.gates == gates and k.cell == cell), None)


def facts_of(float_type: str) -> tuple[str, ...]:
    """The facts (arguments weights cannot tell) of a module type; none for an unknown one."""
    kind = KINDS.get(float_type)
    return kind.facts if kind else ()


def kinds_with_fact(fact: str) -> tuple[str, ...]:
    """The module types that take ``fact``, sorted by name."""
    return tuple(sorted(k.name for k in KINDS.values() if fact in k.facts))


def tensor_shapes(float_type: str, config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The shapes of the tensors of a ``torch.nn`` module of this type and (checked) config,
    by local name, in the module's order."""
    kind = KINDS[float_type]
    hidden, inputs, bias = config["hidden_size"], config["input_size"], config.get("bias", True)
    rows = kind.gates * hidden
    if kind.cell:
        shapes = {"weight_ih": (rows, inputs), "weight_hh": (rows, hidden)}
        return shapes | ({"bias_ih": (rows,), "bias_hh": (rows,)} if bias else {})
    proj = config.get("proj_size", 0)
    directions = ("", "_reverse") if config.get("bidirectional", False) else ("",)
    shapes = {}
    for layer in range(config.get("num_layers", 1)):
        layer_inputs = inputs if layer == 0 else (proj or hidden) * len(directions)
        for suffix in (f"_l{layer}{d}" for d in directions):
            shapes[f"weight_ih{suffix}"] = (rows, layer_inputs)
            shapes[f"weight_hh{suffix}"] = (rows, proj or hidden)
            if bias:
                shapes[f"bias_ih{suffix}"] = shapes[f"bias_hh{suffix}"] = (rows,)
            if proj:
                shapes[f"weight_hr{suffix}"] = (proj, hidden)
    return shapes


# --- quantization kinds -----------------------------------------------------------------------


@dataclass(frozen=True)
class IntegerType:
    """A quantized integer type: its name, the integer dtype its codes are stored in, and its
    full range of codes. ``quant.numerics`` gives each its torch dtype."""

    name: str
    storage: str  # a torch dtype name
    qmin: int
    qmax: int


INTEGER_TYPES: dict[str, IntegerType] = {
    t.name: t
    for t in (
        IntegerType("qint8", "int8", -128, 127),
        IntegerType("quint8", "uint8", 0, 255),
        IntegerType("qint32", "int32", -(2**31), 2**31 - 1),
        IntegerType("int4", "int8", -8, 7),
        IntegerType("uint4", "uint8", 0, 15),
    )
}
DTYPE_NAMES = tuple(INTEGER_TYPES)
# scheme -> (the scheme stored, whether the zero point is the dtype's middle)
SCHEMES: dict[str, tuple[str, bool]] = {
    "per_tensor_affine": ("per_tensor_affine", False),
    "per_channel_affine": ("per_channel_affine", False),
    "per_tensor_symmetric": ("per_tensor_affine", True),
    "per_channel_symmetric": ("per_channel_affine", True),
}
QSCHEME_NAMES = (*SCHEMES, "none")  # none keeps a weight float
FLOAT_TYPES = ("float16", "bfloat16", "float32", "float64")  # torch dtypes recurrent modules run in
OBSERVER_NAMES = ("minmax", "mse", "percentile", "output", "fixed")
ROUNDING_NAMES = ("nearest", "gptq")
CALIBRATED_OBSERVERS = ("output",)  # observers, and roundings other than nearest, need calibration


def chosen_on_calibration(observer: str, rounding: str) -> bool:
    """Whether a quantized weight's scale (its observer) or its rounding is chosen on
    calibration inputs."""
    return observer in CALIBRATED_OBSERVERS or rounding != "nearest"
