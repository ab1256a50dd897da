"""The table of kinds agrees with what it describes: torch.nn's modules, refq's reference
modules and numerics, so that every stage reading it reads the truth."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

from refq_cli import kinds, reference
from refq_cli.quant import numerics


@pytest.mark.parametrize("name", list(kinds.KINDS))
def test_each_kind_is_a_torch_module_with_these_arguments_and_defaults(name):
    kind = kinds.KINDS[name]
    parameters = inspect.signature(getattr(nn, name).__init__).parameters
    for argument in kind.arguments:
        spec = kinds.ARGUMENTS[argument]
        if argument in parameters and parameters[argument].default is not inspect.Parameter.empty:
            assert parameters[argument].default == spec.default, argument
        elif argument in parameters:
            assert spec.required, argument
    module = getattr(nn, name)(4, 3)  # input_size 4, hidden_size 3
    for argument in kind.arguments:  # every argument is stored as its type says
        assert type(getattr(module, argument)) is kinds.ARGUMENTS[argument].type, argument
    weight_hh = module.weight_hh if kind.cell else module.weight_hh_l0
    assert weight_hh.shape[0] == kind.gates * 3
    assert kinds.kind_with(kind.gates, kind.cell) is kind
    assert isinstance(module, nn.RNNCellBase) == kind.cell


@pytest.mark.parametrize("name", list(kinds.KINDS))
def test_tensor_shapes_are_the_modules_own(name):
    config = {"input_size": 5, "hidden_size": 4, "bias": False}
    if not kinds.KINDS[name].cell:
        config |= {"num_layers": 2, "bidirectional": True}
    if name == "LSTM":
        config["proj_size"] = 2
    module = getattr(nn, name)(**config)
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    assert kinds.tensor_shapes(name, config) == shapes
    assert list(kinds.tensor_shapes(name, config)) == list(shapes)  # in the module's order


def test_facts_are_the_arguments_weights_cannot_tell():
    assert set(kinds.FACTS) == {"nonlinearity", "batch_first", "dropout"}
    assert kinds.facts_of("RNN") == ("nonlinearity", "batch_first", "dropout")
    assert kinds.facts_of("LSTMCell") == () and kinds.facts_of("Linear") == ()
    assert kinds.kinds_with_fact("nonlinearity") == ("RNN", "RNNCell")  # as messages list them


def test_every_kind_has_a_reference_module():
    assert {t.__name__ for t in reference.REFERENCE_TYPES} == set(kinds.KINDS)


def test_integer_types_and_schemes_are_what_the_numerics_use():
    assert list(numerics.DTYPES) == list(kinds.DTYPE_NAMES)
    for name, t in kinds.INTEGER_TYPES.items():
        storage = getattr(torch, t.storage)
        assert numerics.DTYPES[name].storage is storage
        info = torch.iinfo(storage)
        assert info.min <= t.qmin < t.qmax <= info.max
    assert set(kinds.QSCHEME_NAMES) == {*kinds.SCHEMES, "none"}


def test_display_path_names_the_root():
    assert kinds.display_path("") == kinds.ROOT == "<root>"
    assert kinds.display_path("enc.rnn") == "enc.rnn"


def test_every_observer_name_has_an_observer():
    from refq_cli.quant.observers import OBSERVERS

    # fixed takes the spec's numbers; the calibrated ones take a Hessian too
    assert {*OBSERVERS, "fixed", *kinds.CALIBRATED_OBSERVERS} == set(kinds.OBSERVER_NAMES)
