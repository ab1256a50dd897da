"""The converter registry: built-ins, lookups, and third-party converters from entry points."""

from __future__ import annotations

import textwrap

import pytest
from torch import nn

from refq_cli import reference
from refq_cli.reference import registry
from tests.scripts import run_refq

PLUGIN = '''
from torch import nn

from refq_cli.reference.registry import register


class FancyLSTM(nn.LSTM):
    """A third party's LSTM subclass."""


def setup():
    @register(FancyLSTM)
    def convert_fancy(module, qparams):
        return "converted by the plugin"
'''


@pytest.fixture
def plugin_on_path(tmp_path, monkeypatch):
    """A package with a refq.converters entry point, importable from tmp_path."""
    (tmp_path / "refq_test_plugin").mkdir()
    (tmp_path / "refq_test_plugin" / "__init__.py").write_text(textwrap.dedent(PLUGIN))
    dist = tmp_path / "refq_test_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: refq-test-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[refq.converters]\nfancy = refq_test_plugin:setup\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_CONVERTERS", dict(registry._CONVERTERS))
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    return tmp_path


def test_builtins_cover_the_six_types():
    table = registry.converters()
    for float_type, ref in [
        (nn.RNNCell, reference.RNNCell),
        (nn.LSTMCell, reference.LSTMCell),
        (nn.GRUCell, reference.GRUCell),
        (nn.RNN, reference.RNN),
        (nn.LSTM, reference.LSTM),
        (nn.GRU, reference.GRU),
    ]:
        assert table[float_type] == ref.from_float


def test_lookup_failure_lists_what_is_registered():
    with pytest.raises(registry.RegistryError) as info:
        registry.converter_for(nn.Linear(2, 2))
    message = str(info.value)
    assert "no converter for torch.nn.modules.linear.Linear" in message
    assert "torch.nn.modules.rnn.GRUCell" in message and "refq.converters" in message


def test_duplicates_are_refused_unless_replaced(monkeypatch):
    monkeypatch.setattr(registry, "_CONVERTERS", dict(registry._CONVERTERS))
    with pytest.raises(registry.RegistryError, match="already registered"):
        registry.register(nn.LSTM)(lambda m, q: m)
    registry.register(nn.LSTM, replace=True)(reference.GRU.from_float)
    assert registry.converters()[nn.LSTM] == reference.GRU.from_float


def test_entry_point_converters_are_found(plugin_on_path):
    import refq_test_plugin

    module = refq_test_plugin.FancyLSTM(2, 3)
    assert registry.converter_for(module)(module, {}) == "converted by the plugin"
    # a subclass without its own converter falls back to its base class's
    assert registry.converter_for(type("Sub", (nn.GRU,), {})(2, 3)) == reference.GRU.from_float


def test_refq_converters_lists_entry_point_converters(plugin_on_path):
    result = run_refq("converters", env={"PYTHONPATH": str(plugin_on_path)})
    assert result.returncode == 0, result.stderr
    assert "refq_test_plugin.FancyLSTM -> refq_test_plugin.setup.<locals>.convert_fancy" in (
        result.stdout
    )
