"""init-config's skeleton: every module and weight, every fact with its default, and a valid
spec that converts the model as the built-in defaults do."""

from __future__ import annotations

import fnmatch
import re

import pytest
import torch
import yaml
from safetensors import safe_open
from torch import nn

from refq_cli.errors import CheckpointError
from refq_cli.io.checkpoint import load_checkpoint
from refq_cli.pipeline.convert import convert_checkpoint as convert
from refq_cli.pipeline.init_config import skeleton
from refq_cli.spec.spec import load_spec, resolve
from tests.checkpoints import speech_state, write

# the recurrent modules of tests.checkpoints.Speech, and the facts each type takes
RECURRENT = {
    "encoder": nn.LSTM,
    "context": nn.GRU,
    "aux": nn.RNN,
    "decoder.cell": nn.LSTMCell,
    "gate": nn.GRUCell,
    "tanh_cell": nn.RNNCell,
}
FACTS = {
    nn.LSTM: ("batch_first", "dropout"),
    nn.GRU: ("batch_first", "dropout"),
    nn.RNN: ("nonlinearity", "batch_first", "dropout"),
    nn.RNNCell: ("nonlinearity",),
    nn.LSTMCell: (),
    nn.GRUCell: (),
}


def weights_of(state, module):
    """Weight names and shapes of ``module`` in a state dict (its biases are not weights)."""
    prefix = module + "."
    return {
        k.removeprefix(prefix): tuple(v.shape)
        for k, v in state.items()
        if k.startswith(prefix) and k.removeprefix(prefix).startswith("weight_")
    }


@pytest.fixture
def source(tmp_path):
    return write(tmp_path, "pt")


def test_every_module_and_weight_is_listed(source):
    text = skeleton(load_checkpoint(source))
    state = speech_state()
    rules = yaml.safe_load(text)["rules"]
    assert [r["match"] for r in rules] == list(RECURRENT)  # in the checkpoint's order, no other
    assert all(r == {"match": r["match"]} for r in rules)  # the suggestions are comments
    found = re.findall(r"\n  # weights: (.*)\n  - match: \"(.*)\"\n", text)
    listed = {module: weights for weights, module in found}
    assert set(listed) == set(RECURRENT)
    for module, line in listed.items():
        expected = weights_of(state, module)
        assert expected, module
        assert line == ", ".join(f"{n} {'x'.join(map(str, s))}" for n, s in expected.items())
    assert "# refq spec for model.pt (sha256 " in text and "6 recurrent modules." in text


MULTI_LAYER = {"encoder"}  # of Speech's modules: dropout follows a layer only in these


def uncommented(text: str) -> str:
    """The skeleton as a user edits it to confirm every fact: each commented-out module key and
    fact under ``modules:`` made a line of its own."""
    head, _, facts = text.partition("\nmodules:\n")
    lines = [re.sub(r'^(\s*)# ("[^"]*":|\w+: )', r"\1\2", line) for line in facts.splitlines()]
    return head + "\nmodules:\n" + "\n".join(lines) + "\n"


def test_every_fact_is_written_with_pytorchs_default_commented_out(source):
    text = skeleton(load_checkpoint(source))
    doc = yaml.safe_load(text)
    assert doc["modules"] is None  # nothing the file records: every fact is left to confirm
    pytorch = {kind: kind(2, 2) for kind in FACTS}  # PyTorch's own defaults
    expected = {
        module: {
            fact: getattr(pytorch[kind], fact)
            for fact in FACTS[kind]
            if fact != "dropout" or module in MULTI_LAYER
        }
        for module, kind in RECURRENT.items()
        if FACTS[kind]
    }
    assert yaml.safe_load(uncommented(text))["modules"] == expected
    assert yaml.safe_load(uncommented(text))["modules"]["aux"] == {
        "nonlinearity": "tanh",
        "batch_first": False,
    }
    assert doc["defaults"] == {
        "dtype": "qint8",
        "qscheme": "per_channel_symmetric",
        "axis": 0,
        "observer": "minmax",
        "rounding": "nearest",
        "percentile": 99.99,
    }
    assert doc["version"] == 1 and doc["is_decomposed"] is False


def test_converting_with_the_unedited_skeleton_warns_of_each_fact_as_without_it(source, tmp_path):
    # Once, the skeleton wrote every default out, so a batch_first model converted as
    # batch_first=False without a word.
    spec = tmp_path / "skeleton.yaml"
    spec.write_text(skeleton(load_checkpoint(source)))
    plain = tmp_path / "plain.yaml"
    plain.write_text("version: 1\n")
    assumed = [
        convert(source, s, tmp_path / f"{s.stem}.st").report["assumed_facts"] for s in (spec, plain)
    ]
    assert assumed[0] == assumed[1] and assumed[0]["context"] == {"batch_first": False}
    assert "dropout" not in assumed[0]["aux"]  # one layer: nothing for dropout to follow


def test_a_checkpoint_without_recurrent_modules_has_no_skeleton(tmp_path):
    torch.save({"head.weight": torch.zeros(2, 2)}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match=r"x\.pt: no recurrent module found"):
        skeleton(load_checkpoint(tmp_path / "x.pt"))


def test_facts_a_file_records_are_written_as_recorded(tmp_path):
    text = skeleton(load_checkpoint(write(tmp_path, "pickle"), trust_code=True))
    facts = yaml.safe_load(text)["modules"]
    assert facts["aux"]["nonlinearity"] == "relu"  # Speech's aux, as the pickled module has it
    assert '  "aux":\n    nonlinearity: "relu"  # as the file records it\n' in text


def test_the_skeleton_converts_the_model_as_the_defaults_do(source, tmp_path):
    spec = tmp_path / "skeleton.yaml"
    spec.write_text(skeleton(load_checkpoint(source)))
    load_spec(spec)  # a valid spec
    plain = tmp_path / "plain.yaml"
    plain.write_text("version: 1\n")
    outputs = []
    for name, s in (("skeleton", spec), ("plain", plain)):
        convert(source, s, tmp_path / f"{name}.st")
        with safe_open(str(tmp_path / f"{name}.st"), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
            outputs.append((tensors, f.metadata()["refq.modules"]))
    (a, modules_a), (b, modules_b) = outputs
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert modules_a == modules_b  # the same parameters, types and configs


def test_each_rule_matches_exactly_its_module(tmp_path):
    state = {
        f"{m}.{k}": v
        for m in ("enc[0]", "enc0", "a*b", "aXb")
        for k, v in nn.GRU(3, 4).state_dict().items()
    }
    torch.save(state, tmp_path / "odd.pt")
    checkpoint = load_checkpoint(tmp_path / "odd.pt")
    spec = tmp_path / "q.yaml"
    spec.write_text(skeleton(checkpoint))
    rules = yaml.safe_load(spec.read_text())["rules"]
    assert len(rules) == 4
    for rule, module in zip(rules, checkpoint.modules, strict=True):
        matched = [m for m in checkpoint.modules if fnmatch.fnmatchcase(m, rule["match"])]
        assert matched == [module], rule
    plans = resolve(
        load_spec(spec),
        {p: m.weight_names for p, m in checkpoint.modules.items()},
        {p: m.float_type for p, m in checkpoint.modules.items()},
    )
    assert set(plans) == set(checkpoint.modules)


def test_a_module_at_the_root_and_cells_without_facts(tmp_path):
    torch.save(nn.LSTM(3, 4).state_dict(), tmp_path / "root.pt")
    text = skeleton(load_checkpoint(tmp_path / "root.pt"))
    doc = yaml.safe_load(text)
    assert [r["match"] for r in doc["rules"]] == ["<root>"]
    assert yaml.safe_load(uncommented(text))["modules"] == {"<root>": {"batch_first": False}}
    cells = {f"c.{k}": v for k, v in nn.GRUCell(3, 4).state_dict().items()}
    torch.save(cells, tmp_path / "cells.pt")
    text = skeleton(load_checkpoint(tmp_path / "cells.pt"))
    assert yaml.safe_load(text)["modules"] == {} and "\nmodules: {}\n" in text
    spec = tmp_path / "cells.yaml"
    spec.write_text(text)
    assert convert(tmp_path / "cells.pt", spec, tmp_path / "cells.st").report["modules"]
