"""The converter registry: built-ins, lookups, and third-party converters from entry points."""

from __future__ import annotations

import textwrap

import pytest
import torch
from torch import nn

from refq_cli import reference
from refq_cli.pipeline.artifact import ArtifactError, load_artifact
from refq_cli.pipeline.convert import convert_checkpoint as convert
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

    def convert_lstm(module, qparams):
        return reference.LSTM.from_float(module, qparams)

    registry.register(nn.LSTM, replace=True)(convert_lstm)
    assert registry.converters()[nn.LSTM] is convert_lstm


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


@pytest.fixture
def own_registry(monkeypatch):
    """Registrations made in the test end with it."""
    monkeypatch.setattr(registry, "_CONVERTERS", dict(registry._CONVERTERS))
    monkeypatch.setattr(registry, "_READERS", dict(registry._READERS))


class PluginLSTMCell(reference.LSTMCell):
    """A third party's reference LSTMCell, with a name of its own."""

    _NAME = "PluginQuantizedLSTMCell"


def lstm_cell_checkpoint(tmp_path):
    torch.manual_seed(0)
    torch.save(
        {"cell." + k: v for k, v in nn.LSTMCell(4, 3).state_dict().items()}, tmp_path / "c.pt"
    )
    (tmp_path / "q.yaml").write_text("version: 1\n")
    return tmp_path / "c.pt", tmp_path / "q.yaml"


def test_an_artifact_is_read_back_by_the_class_that_wrote_it(tmp_path, own_registry):
    # A plugin replacing nn.LSTMCell's converter: load_artifact once built refq's own class
    # instead, silently.
    registry.register(nn.LSTMCell, replace=True)(PluginLSTMCell.from_float)
    source, spec = lstm_cell_checkpoint(tmp_path)
    convert(source, spec, tmp_path / "a.refq.safetensors")
    artifact = load_artifact(tmp_path / "a.refq.safetensors")
    assert type(artifact.modules["cell"]) is PluginLSTMCell
    recorded = artifact.metadata["refq.modules"]["cell"]["reference_type"]
    assert recorded == "PluginQuantizedLSTMCell"


def test_a_module_no_registered_class_reads_is_refused(tmp_path, own_registry):
    registry.register(nn.LSTMCell, replace=True)(PluginLSTMCell.from_float)
    source, spec = lstm_cell_checkpoint(tmp_path)
    convert(source, spec, tmp_path / "a.refq.safetensors")
    del registry._READERS["PluginQuantizedLSTMCell"]  # the plugin is not installed here
    with pytest.raises(ArtifactError, match="no registered converter reads LSTMCell modules named"):
        load_artifact(tmp_path / "a.refq.safetensors")


def test_a_converter_whose_modules_cannot_be_read_back_writes_nothing(tmp_path, own_registry):
    class Unnamed(reference.LSTMCell):  # inherits refq's name, which refq's class reads
        pass

    registry.register(nn.LSTMCell, replace=True)(lambda m, q: Unnamed.from_float(m, q))
    source, spec = lstm_cell_checkpoint(tmp_path)
    with pytest.raises(registry.RegistryError, match="reads modules of that name back"):
        convert(source, spec, tmp_path / "a.refq.safetensors")
    assert not (tmp_path / "a.refq.safetensors").exists()
    registry.register(nn.LSTMCell, replace=True, reader=Unnamed)(
        lambda m, q: Unnamed.from_float(m, q)
    )
    convert(source, spec, tmp_path / "a.refq.safetensors")
    assert type(load_artifact(tmp_path / "a.refq.safetensors").modules["cell"]) is Unnamed


def test_readers_are_refq_reference_modules_and_names_are_not_taken_twice(own_registry):
    with pytest.raises(registry.RegistryError, match="no subclass of refq's reference modules"):
        registry.register(nn.LSTMCell, replace=True, reader=nn.LSTMCell)(lambda m, q: m)

    class Imposter(reference.GRU):
        _NAME = "QuantizedLSTM(Reference)"  # refq's LSTM's name

    class TheirGRU(nn.GRU):
        pass

    with pytest.raises(registry.RegistryError, match="already reads modules named"):
        registry.register(TheirGRU)(Imposter.from_float)
    assert TheirGRU not in registry.converters()  # refused whole
    assert registry.reader_for("QuantizedLSTM(Reference)", "LSTM") is reference.LSTM


def test_a_reader_reads_only_the_float_type_it_stands_for(own_registry):
    # An LSTM entry naming refq's GRU was rebuilt as a GRU, stopped only by chance later.
    with pytest.raises(registry.RegistryError, match=r"records a LSTM module named .*stands for"):
        registry.reader_for("QuantizedGRU(Reference)", "LSTM")
    with pytest.raises(registry.RegistryError, match=r"stands for torch\.nn\.modules\.rnn\.GRU"):
        registry.register(nn.LSTM, replace=True)(reference.GRU.from_float)
    with pytest.raises(registry.RegistryError, match="stands for"):
        registry.register(nn.LSTMCell, replace=True, reader=reference.GRUCell)(lambda m, q: m)


def test_replacing_a_converter_cannot_take_the_name_another_converter_writes(own_registry):
    # A subclass without a name of its own took over refq's LSTM name: every nn.LSTM
    # conversion then failed, and every LSTM artifact loaded as the subclass.
    class Hijack(reference.LSTM):
        pass

    class TheirLSTM(nn.LSTM):
        pass

    with pytest.raises(registry.RegistryError, match=r"which the converter of torch\.nn"):
        registry.register(TheirLSTM, replace=True)(Hijack.from_float)
    assert registry.reader_for("QuantizedLSTM(Reference)", "LSTM") is reference.LSTM


def test_bad_readers_are_refused_with_a_registry_error(own_registry):
    with pytest.raises(registry.RegistryError, match="'notaclass' is no subclass"):
        registry.register(nn.LSTMCell, replace=True, reader="notaclass")(lambda m, q: m)

    class Nameless(reference._weights.QuantizedWeightsMixin, nn.Module):
        _FLOAT_TYPE = nn.LSTMCell

    with pytest.raises(registry.RegistryError, match="has no _NAME"):
        registry.register(nn.LSTMCell, replace=True, reader=Nameless)(lambda m, q: m)


@pytest.mark.parametrize("made", ["not a module", nn.Linear(4, 3)])
def test_a_converter_that_makes_no_reference_module_is_named(tmp_path, own_registry, made):
    # It crashed as "internal error: TypeError: 'str' object is not callable".
    registry.register(nn.LSTMCell, replace=True)(lambda m, q: made)
    source, spec = lstm_cell_checkpoint(tmp_path)
    with pytest.raises(registry.RegistryError, match=r"made .* not a refq reference module"):
        convert(source, spec, tmp_path / "a.refq.safetensors")
    assert not (tmp_path / "a.refq.safetensors").exists()
