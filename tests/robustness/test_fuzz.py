"""Fuzzing the spec loader and the artifact reader: every input loads or raises RefqError.

Marked slow. The budget is REFQ_FUZZ_EXAMPLES per test (400 by default, which CI runs;
``REFQ_FUZZ_EXAMPLES=10000 pytest -m slow tests/robustness`` for the full run).
"""

from __future__ import annotations

import os
import string
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refq_cli.errors import RefqError
from refq_cli.pipeline.artifact import load_artifact
from refq_cli.pipeline.convert import convert_checkpoint as convert
from refq_cli.pipeline.inspect import describe_artifact
from refq_cli.spec.spec import parse_spec, resolve
from tests.checkpoints import write

BUDGET = int(os.environ.get("REFQ_FUZZ_EXAMPLES", "400"))
FUZZ = settings(
    max_examples=BUDGET,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SPEC_WORDS = [
    "version",
    "defaults",
    "rules",
    "modules",
    "match",
    "skip",
    "weights",
    "dtype",
    "qscheme",
    "axis",
    "observer",
    "scale",
    "zero_point",
    "quant_min",
    "quant_max",
    "percentile",
    "is_decomposed",
    "qint8",
    "quint8",
    "int4",
    "per_channel_affine",
    "per_tensor_symmetric",
    "minmax",
    "mse",
    "fixed",
    "none",
    "weight_hh",
    "*",
    "enc",
    "nonlinearity",
    "relu",
    "batch_first",
    "<root>",
]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True),
    st.sampled_from(SPEC_WORDS),
    st.text(max_size=8),
)
trees = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(
            st.one_of(st.sampled_from(SPEC_WORDS), st.text(max_size=5)), children, max_size=5
        ),
    ),
    max_leaves=25,
)


def loads_or_refuses(text: str | bytes) -> None:
    try:
        spec = parse_spec(text, "fuzz.yaml")
        resolve(
            spec,
            {"enc": ["weight_ih", "weight_hh"], "": ["weight_ih_l0"]},
            {"enc": "GRUCell", "": "LSTM"},
        )
    except RefqError:
        pass


@pytest.mark.slow
@FUZZ
@given(tree=trees)
def test_random_yaml_trees(tree):
    loads_or_refuses(yaml.safe_dump({"version": 1, "x": tree} if isinstance(tree, dict) else tree))
    if isinstance(tree, dict):
        loads_or_refuses(yaml.safe_dump({"version": 1, **{str(k): v for k, v in tree.items()}}))


@pytest.mark.slow
@FUZZ
@given(data=st.binary(max_size=300))
def test_random_bytes_as_a_spec(data):
    loads_or_refuses(data)


@pytest.mark.slow
@FUZZ
@given(preset=st.sampled_from(sorted(CONFIGS.glob("*.yaml"))), data=st.data())
def test_mutated_real_specs(preset, data):
    text = preset.read_text()
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(text)))
        edit = data.draw(st.sampled_from(["insert", "delete", "replace"]))
        piece = data.draw(st.text(alphabet=string.printable + "&*!|>{}[]:-", max_size=6))
        if edit == "insert":
            text = text[:at] + piece + text[at:]
        elif edit == "delete":
            text = text[:at] + text[at + len(piece) :]
        else:
            text = text[:at] + piece + text[at + len(piece) :]
    loads_or_refuses(text)


@pytest.fixture(scope="module")
def real_artifact(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("artifact")
    spec = folder / "q.yaml"
    spec.write_text("version: 1\nmodules:\n  aux: {nonlinearity: relu}\n")
    path = folder / "a.safetensors"
    convert(write(folder, "pt"), spec, path)
    return path


def reads_or_refuses(path: Path) -> None:
    for read in (describe_artifact, load_artifact):
        try:
            result = read(path)
        except RefqError:
            continue
        if read is load_artifact:
            for module in result.modules.values():  # what loads must also run
                x = torch.randn(2, module.input_size)
                if not hasattr(module, "num_layers"):
                    module(x)
                else:
                    module(x.unsqueeze(0))


@pytest.mark.slow
@FUZZ
@given(data=st.data())
def test_mutated_real_artifacts(tmp_path_factory, real_artifact, data):
    blob = bytearray(real_artifact.read_bytes())
    header_end = 8 + int.from_bytes(blob[:8], "little")
    kind = data.draw(
        st.sampled_from(["flip-header", "flip-anywhere", "truncate", "append", "length"])
    )
    if kind == "flip-header":
        for _ in range(data.draw(st.integers(1, 3))):
            at = data.draw(st.integers(8, header_end - 1))
            blob[at] = data.draw(st.sampled_from(b'{}[]":,0123456789-eE. abcxyz'))
    elif kind == "flip-anywhere":
        at = data.draw(st.integers(0, len(blob) - 1))
        blob[at] ^= 1 << data.draw(st.integers(0, 7))
    elif kind == "truncate":
        blob = blob[: data.draw(st.integers(0, len(blob) - 1))]
    elif kind == "append":
        blob += data.draw(st.binary(min_size=1, max_size=64))
    else:
        blob[:8] = data.draw(st.integers(0, 2**63)).to_bytes(8, "little")
    path = tmp_path_factory.mktemp("mut") / "m.safetensors"
    path.write_bytes(bytes(blob))
    reads_or_refuses(path)


@pytest.mark.slow
@FUZZ
@given(data=st.binary(max_size=200))
def test_random_bytes_as_an_artifact(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("rand") / "r.safetensors"
    path.write_bytes(data)
    reads_or_refuses(path)
