"""Fuzzing an artifact's metadata: a value of the wrong type, a missing or an extra key at any
place in the JSON either reads (and then runs, and ``refq inspect`` shows it, as strict JSON
with ``--json``) or is refused with one short line.

Marked slow; REFQ_FUZZ_EXAMPLES examples, as in ``test_fuzz.py``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from refq_cli.cli.app import app
from refq_cli.errors import RefqError
from refq_cli.io.header import read_header
from refq_cli.pipeline.artifact import load_artifact
from refq_cli.pipeline.convert import convert_checkpoint as convert
from refq_cli.pipeline.inspect import describe_artifact
from tests.checkpoints import write
from tests.robustness.test_fuzz import FUZZ

JSON_KEYS = ("refq.modules", "refq.source", "refq.producer", "refq.spec")

json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.sampled_from([0, 1, -1, 2, 10**400, 40000]),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=6),
        st.sampled_from(["RNN", "LSTM", "float32", "qint8", "per_channel_affine", "none", "\n"]),
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=3), st.dictionaries(st.text(max_size=4), children, max_size=3)
    ),
    max_leaves=6,
)


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    folder = tmp_path_factory.mktemp("real")
    spec = folder / "q.yaml"
    spec.write_text(
        "version: 1\nmodules:\n  aux: {nonlinearity: relu}\n"
        "rules:\n  - {match: gate, qscheme: per_tensor_affine, dtype: quint8}\n"
        "  - {match: tanh_cell, qscheme: none}\n"
    )
    path = folder / "a.refq.safetensors"
    convert(write(folder, "pt"), spec, path)
    header = read_header(path)
    return header, {k: json.loads(header[k]) for k in JSON_KEYS}, load_file(str(path))


def places(value, at=()):
    """Every place in a JSON tree, as the keys and indices leading to it."""
    yield at
    if isinstance(value, dict):
        for k, v in value.items():
            yield from places(v, (*at, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from places(v, (*at, i))


def reads_or_refuses(path: Path) -> None:
    for read in (describe_artifact, load_artifact):
        try:
            result = read(path)
        except RefqError as exc:
            message = str(exc)
            assert "\n" not in message and len(message) < 1000, message
            assert str(path) in message, message
            continue
        if read is load_artifact:
            for module in result.modules.values():  # what loads must also run
                x = torch.randn(2, module.input_size)
                module(x if not hasattr(module, "num_layers") else x.unsqueeze(0))
    for args in (["inspect", "--all", "--channels"], ["inspect", "--json"]):  # what reads, shows
        result = CliRunner().invoke(app, [*args, str(path)])
        assert result.exit_code in (0, 2), result.output
        assert len(result.stderr.splitlines()) == (result.exit_code == 2), result.stderr
        if args[-1] == "--json" and result.exit_code == 0:
            json.loads(result.stdout, parse_constant=_no_constants)


def _no_constants(name):
    raise AssertionError(f"{name} in JSON")


@pytest.mark.slow
@FUZZ
@given(data=st.data())
def test_wrong_values_anywhere_in_the_metadata(tmp_path_factory, real, data):
    header, parsed, tensors = real
    key = data.draw(st.sampled_from(JSON_KEYS))
    tree = copy.deepcopy(parsed[key])
    at = data.draw(st.sampled_from(list(places(tree))))
    edit = data.draw(st.sampled_from(["replace", "delete", "add"]))
    value = data.draw(json_values)
    if not at:
        tree = value
    else:
        parent = tree
        for step in at[:-1]:
            parent = parent[step]
        if edit == "delete":
            del parent[at[-1]]
        elif edit == "add" and isinstance(parent, dict):
            parent[data.draw(st.text(max_size=6))] = value
        else:
            parent[at[-1]] = value
    metadata = {**header, key: json.dumps(tree)}
    path = tmp_path_factory.mktemp("meta") / "m.refq.safetensors"
    save_file(tensors, str(path), metadata)
    reads_or_refuses(path)
