"""Finding the recurrent modules in a checkpoint's tensors, and building them as float modules.

Recurrent modules are found from key patterns and shapes: ``P.weight_ih`` / ``P.weight_hh`` is a
cell, ``P.weight_ih_l{k}[_reverse]`` a multi-layer module; the gate count (rows of ``weight_hh``
over the hidden size) tells RNN (1), GRU (3) and LSTM (4) apart, and ``weight_hr_l{k}`` means an
LSTM with ``proj_size``. What weights cannot tell (:data:`refq_cli.kinds.FACTS`) comes from the
file's own modules where it has them (pickled modules, TorchScript), else from the spec.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from refq_cli.errors import CheckpointError
from refq_cli.kinds import (
    ARGUMENTS,
    FLOAT_TYPES,
    KINDS,
    ROOT,
    display_path,
    facts_of,
    kind_with,
    tensor_key,
)

Facts = dict[str, dict[str, Any]]  # module path -> constructor arguments a file records
_LAYER_KEY = re.compile(r"^(weight|bias)_(ih|hh|hr)_l(\d+)(_reverse)?$")
_CELL_KEYS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")

_SEQUENCES = sorted((k for k in KINDS.values() if not k.cell), key=lambda k: k.gates)
_GATE_COUNTS = ", ".join(f"{k.gates} ({k.name})" for k in _SEQUENCES[:-1]) + (
    f" or {_SEQUENCES[-1].gates} ({_SEQUENCES[-1].name})"
)  # "1 (RNN), 3 (GRU) or 4 (LSTM)"


@dataclass(frozen=True)
class RecurrentModule:
    """A recurrent module found in a checkpoint: its float type and constructor config."""

    path: str
    float_type: str  # RNNCell | LSTMCell | GRUCell | RNN | LSTM | GRU
    config: dict[str, Any]
    tensor_names: tuple[str, ...]  # local names, in the float module's order
    # facts weights cannot tell (batch_first, dropout, nonlinearity) as the file records them:
    # for pickled modules and TorchScript archives; state dicts record none
    recorded: dict[str, Any] = field(default_factory=dict)

    @property
    def weight_names(self) -> list[str]:
        return [n for n in self.tensor_names if n.startswith("weight")]

    def key(self, name: str) -> str:
        return tensor_key(self.path, name)

    @property
    def asked_facts(self) -> list[str]:
        """The facts a spec may give for this module (``kinds.facts_of`` its kind), less
        ``dropout`` for a module of one layer, after which there is no layer to drop out for."""
        facts = facts_of(self.float_type)
        return [f for f in facts if f != "dropout" or self.config.get("num_layers", 1) > 1]

    def describe(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.config.items())
        return f"{self.float_type}({args})"

    def build(self, tensors: Mapping[str, torch.Tensor], facts: Mapping[str, Any]) -> nn.Module:
        """The float module with ``tensors``' weights, constructed with the facts the file
        records and ``facts`` (from a spec or an artifact), which must not contradict them."""
        for key, value in facts.items():
            if key in self.recorded and self.recorded[key] != value:
                raise CheckpointError(
                    f"{display_path(self.path)}: given {key}={value!r}, but the file's module "
                    f"records {key}={self.recorded[key]!r}"
                )
        config = {**self.config, **self.recorded, **facts}
        first = tensors[self.key(self.tensor_names[0])]
        module = getattr(nn, self.float_type)(**config, device="meta", dtype=first.dtype)
        local = {name: tensors[self.key(name)] for name in self.tensor_names}
        expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        actual = {k: tuple(v.shape) for k, v in local.items()}
        if expected != actual:
            diff = [
                f"{k}: expected {expected.get(k, 'nothing')}, got {actual.get(k, 'nothing')}"
                for k in sorted(set(expected) | set(actual))
                if expected.get(k) != actual.get(k)
            ]
            raise CheckpointError(
                f"{display_path(self.path)}: weights do not fit {self.describe()}: "
                + "; ".join(diff)
            )
        module.load_state_dict(local, strict=True, assign=True)
        return module.train(False)


def with_recorded(
    module: RecurrentModule, recorded: Mapping[str, Any], source: str
) -> RecurrentModule:
    """``module`` with the facts its file records; refused where they contradict its weights."""
    for key, inferred in {"proj_size": ARGUMENTS["proj_size"].default, **module.config}.items():
        if key in recorded and recorded[key] != inferred:
            raise CheckpointError(
                f"{_where(module.path, source)}: the module records {key}={recorded[key]!r}, "
                f"but its weights say {inferred!r}; the file is inconsistent"
            )
    facts = {k: recorded[k] for k in facts_of(module.float_type) if k in recorded}
    return replace(module, recorded=facts)


def recorded_facts(root: nn.Module) -> dict[str, dict[str, Any]]:
    """Constructor arguments of every recurrent module in a module tree, by path."""
    found = {}
    for name, module in root.named_modules(remove_duplicate=False):
        if isinstance(module, torch.jit.ScriptModule):  # trusted TorchScript
            kind = KINDS.get(getattr(module, "original_name", None))
        else:
            kind = next((k for t, k in KINDS.items() if type(module) is getattr(nn, t)), None)
        if kind is not None:
            found[name] = {a: getattr(module, a) for a in kind.arguments if hasattr(module, a)}
    return found


# --- finding recurrent modules ----------------------------------------------------------------


def find_recurrent_modules(
    tensors: Mapping[str, torch.Tensor], source: str = "checkpoint"
) -> dict[str, RecurrentModule]:
    """Recurrent modules by path, inferred from key patterns and shapes."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unnamed: dict[str, str] = {}  # group -> a key of it with an empty name in its module path
    for key, tensor in tensors.items():
        prefix, _, local = key.rpartition(".")
        groups.setdefault(prefix, {})[local] = tensor
        if "" in key.split(".")[:-1]:
            unnamed.setdefault(prefix, key)
    found = {}
    for prefix, local in groups.items():
        is_cell = "weight_hh" in local or "weight_ih" in local
        is_sequence = any(_LAYER_KEY.match(k) for k in local)
        if (is_cell or is_sequence) and prefix in unnamed:
            raise CheckpointError(
                f"{source}: key {unnamed[prefix]!r} has an empty name in its module path; "
                "module paths are names joined by single dots"
            )
        if is_cell and is_sequence:
            raise CheckpointError(
                f"{_where(prefix, source)}: holds both cell keys (weight_ih) and layer keys "
                "(weight_ih_l0); one module cannot be both"
            )
        if (is_cell or is_sequence) and prefix.split(".")[0] == ROOT:
            raise CheckpointError(
                f"{source}: module path {prefix!r}: {ROOT!r} names the root module in specs "
                "and reports; rename these keys"
            )
        if is_cell or is_sequence:
            module = (_cell if is_cell else _sequence)(prefix, local, source)
            _check_dtypes(module, local, source)
            found[prefix] = module
    return found


_WEIGHT_DTYPES = tuple(getattr(torch, name) for name in FLOAT_TYPES)


def _check_dtypes(module: RecurrentModule, local: Mapping[str, torch.Tensor], source: str) -> None:
    """Recurrent weights are of one of the float dtypes torch's recurrent modules run in, and
    every tensor of one module has the same."""
    where = _where(module.path, source)
    for name in module.tensor_names:
        dtype = local[name].dtype
        if dtype not in _WEIGHT_DTYPES:
            hint = "" if dtype.is_floating_point else " (is this file already quantized?)"
            raise CheckpointError(
                f"{where}: {name} has dtype {_dtype_name(dtype)}; recurrent weights must be "
                f"{', '.join(FLOAT_TYPES[:-1])} or {FLOAT_TYPES[-1]}{hint}"
            )
    dtypes = {local[name].dtype: name for name in module.tensor_names}
    if len(dtypes) > 1:
        found = ", ".join(f"{_dtype_name(d)} ({n})" for d, n in dtypes.items())
        raise CheckpointError(f"{where}: the module's weights have different dtypes: {found}")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _where(prefix: str, source: str) -> str:
    return f"{source}: {display_path(prefix)}"


def _gates(prefix: str, weight_hh: torch.Tensor, hidden: int, source: str, key: str) -> int:
    if weight_hh.dim() != 2 or hidden == 0 or weight_hh.shape[0] % hidden:
        raise CheckpointError(
            f"{_where(prefix, source)}: {key} has shape {tuple(weight_hh.shape)}, which is no "
            "whole number of gates of the hidden size"
        )
    gates = weight_hh.shape[0] // hidden
    if kind_with(gates, cell=True) is None:
        raise CheckpointError(
            f"{_where(prefix, source)}: {key} has {gates} gates (shape "
            f"{tuple(weight_hh.shape)}); recurrent weights have {_GATE_COUNTS}"
        )
    return gates


def _cell(prefix: str, local: Mapping[str, torch.Tensor], source: str) -> RecurrentModule:
    missing = [k for k in ("weight_ih", "weight_hh") if k not in local]
    biases = [k for k in ("bias_ih", "bias_hh") if k in local]
    if missing or len(biases) == 1:
        absent = missing + [k for k in ("bias_ih", "bias_hh") if k not in local and biases]
        raise CheckpointError(
            f"{_where(prefix, source)}: looks like a recurrent cell but lacks "
            f"{', '.join(absent)} (has {', '.join(sorted(local))})"
        )
    weight_ih, weight_hh = local["weight_ih"], local["weight_hh"]
    if weight_ih.dim() != 2:
        raise CheckpointError(
            f"{_where(prefix, source)}: weight_ih must be 2-D, got shape {tuple(weight_ih.shape)}"
        )
    hidden = weight_hh.shape[1] if weight_hh.dim() == 2 else 0
    gates = _gates(prefix, weight_hh, hidden, source, "weight_hh")
    config = {"input_size": weight_ih.shape[1], "hidden_size": hidden, "bias": bool(biases)}
    names = tuple(k for k in _CELL_KEYS if k in local)
    return RecurrentModule(prefix, kind_with(gates, cell=True).name, config, names)  # type: ignore[union-attr]


def _sequence(prefix: str, local: Mapping[str, torch.Tensor], source: str) -> RecurrentModule:
    layers = sorted({int(m.group(3)) for k in local if (m := _LAYER_KEY.match(k))})
    num_layers = layers[-1] + 1
    bidirectional = any(k.endswith("_reverse") for k in local if _LAYER_KEY.match(k))
    has_bias = "bias_ih_l0" in local
    has_proj = "weight_hr_l0" in local
    suffixes = ["", "_reverse"] if bidirectional else [""]
    expected = []
    for layer in range(num_layers):
        for suffix in suffixes:
            names = ["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if has_bias else [])
            names += ["weight_hr"] if has_proj else []
            expected += [f"{n}_l{layer}{suffix}" for n in names]
    present = {k for k in local if _LAYER_KEY.match(k)}
    if set(expected) != present:
        missing = sorted(set(expected) - present)
        extra = sorted(present - set(expected))
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + (
            [f"unexpected {', '.join(extra)}"] if extra else []
        )
        raise CheckpointError(
            f"{_where(prefix, source)}: inconsistent recurrent weights: {'; '.join(parts)}"
        )
    weight_ih, weight_hh = local["weight_ih_l0"], local["weight_hh_l0"]
    if weight_ih.dim() != 2 or weight_hh.dim() != 2:
        raise CheckpointError(
            f"{_where(prefix, source)}: weight_ih_l0 and weight_hh_l0 must be 2-D"
        )
    hidden = local["weight_hr_l0"].shape[1] if has_proj else weight_hh.shape[1]
    gates = _gates(prefix, weight_hh, hidden, source, "weight_hh_l0")
    kind = kind_with(gates, cell=False)
    if has_proj and "proj_size" not in kind.arguments:  # type: ignore[union-attr]
        raise CheckpointError(
            f"{_where(prefix, source)}: weight_hr (projections) belongs to an LSTM, but "
            f"weight_hh_l0 has {gates} gates"
        )
    config: dict[str, Any] = {
        "input_size": weight_ih.shape[1],
        "hidden_size": hidden,
        "num_layers": num_layers,
        "bias": has_bias,
        "bidirectional": bidirectional,
    }
    if has_proj:
        config["proj_size"] = weight_hh.shape[1]
        if config["proj_size"] >= hidden:
            raise CheckpointError(
                f"{_where(prefix, source)}: weight_hr_l0 projects {hidden} hidden units onto "
                f"{config['proj_size']}; an LSTM's proj_size must be smaller than its hidden size"
            )
    return RecurrentModule(prefix, kind_with(gates, cell=False).name, config, tuple(expected))  # type: ignore[union-attr]
