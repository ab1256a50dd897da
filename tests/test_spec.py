"""The YAML spec: reading, every error with its file:line:column, resolving, the JSON Schema."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from refq_cli.errors import SpecError
from refq_cli.spec.spec import json_schema, load_spec, parse_spec, resolve

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

FULL = """\
version: 1
is_decomposed: false
defaults:
  dtype: qint8
  qscheme: per_channel_affine
  axis: 0
  observer: minmax
rules:
  - match: "encoder*"
    qscheme: per_tensor_affine
  - match: decoder
    weights:
      weight_hh: {observer: fixed, scale: 0.0123, zero_point: 0}
  - match: "aux.*"
    skip: true
modules:
  encoder: {nonlinearity: relu, batch_first: true}
"""
MODULES = {
    "encoder": ["weight_ih_l0", "weight_hh_l0"],
    "decoder": ["weight_ih", "weight_hh"],
    "aux.rnn": ["weight_ih", "weight_hh"],
}


def test_the_design_example_parses_and_resolves():
    spec = parse_spec(FULL, "q.yaml")
    plans = resolve(spec, MODULES)
    assert plans["encoder"].weights["weight_hh_l0"].qscheme == "per_tensor_affine"
    assert plans["encoder"].weights["weight_hh_l0"].dtype == "qint8"
    assert {k: s.value for k, s in plans["encoder"].facts.items()} == {
        "nonlinearity": "relu",
        "batch_first": True,
    }
    fixed = plans["decoder"].weights["weight_hh"]
    assert (fixed.observer, fixed.scale, fixed.zero_point) == ("fixed", 0.0123, 0)
    assert plans["decoder"].weights["weight_ih"].observer == "minmax"
    assert plans["aux.rnn"].skip and not plans["decoder"].skip


def test_round_trip_spec_to_yaml_to_spec():
    spec = parse_spec(FULL, "q.yaml")
    again = parse_spec(yaml.safe_dump(spec.to_dict()), "again.yaml")
    assert again.to_dict() == spec.to_dict()


def test_later_rules_override_earlier_ones_field_by_field():
    spec = parse_spec(
        "version: 1\nrules:\n  - {match: '*', dtype: quint8, qscheme: per_tensor_affine}\n"
        "  - {match: enc, qscheme: per_channel_affine}\n",
        "q.yaml",
    )
    w = resolve(spec, {"enc": ["weight_ih"]})["enc"].weights["weight_ih"]
    assert (w.dtype, w.qscheme) == ("quint8", "per_channel_affine")


def test_builtin_defaults_are_int8_per_channel_symmetric_minmax():
    w = resolve(parse_spec("version: 1\n", "q.yaml"), {"": ["weight_ih"]})[""].weights["weight_ih"]
    assert (w.dtype, w.qscheme, w.observer, w.axis) == (
        "qint8",
        "per_channel_symmetric",
        "minmax",
        0,
    )


BAD_SPECS = {
    "syntax": ("version: 1\ndefaults: [1, 2\n", "q.yaml:3:1: YAML syntax error"),
    "tab": ("version: 1\ndefaults:\n\tdtype: qint8\n", "q.yaml:3:1: YAML syntax error"),
    "duplicate-key": ("version: 1\nversion: 1\n", "q.yaml:2:1: duplicate key 'version'"),
    "unknown-key": (
        "version: 1\ndefualts: {}\n",
        "q.yaml:2:1: unknown key 'defualts' in the spec; did you mean 'defaults'?",
    ),
    "unknown-field": (
        "version: 1\ndefaults: {dtpye: qint8}\n",
        "q.yaml:2:12: unknown key 'dtpye' in defaults; did you mean 'dtype'?",
    ),
    "wrong-type": (
        "version: 1\ndefaults: {axis: zero}\n",
        "q.yaml:2:18: axis must be an integer, got 'zero'",
    ),
    "bad-enum": (
        "version: 1\ndefaults: {dtype: qint16}\n",
        "q.yaml:2:19: dtype must be one of .* got 'qint16'; did you mean 'qint8'?",
    ),
    "python-tag": (
        "version: 1\ndefaults: !!python/object:os.system {}\n",
        "q.yaml:2:11: defaults must be a mapping",
    ),
    "python-tag-scalar": (
        "version: !!python/name:os.system 1\n",
        "q.yaml:1:10: tag 'tag:yaml.org,2002:python/name:os.system' is not allowed",
    ),
    "empty": ("", "q.yaml:1:1: the spec is empty"),
    "comments-only": ("# nothing\n", "q.yaml:1:1: the spec is empty"),
    "missing-version": ("defaults: {}\n", "q.yaml:1:1: missing 'version: 1'"),
    "future-version": ("version: 2\n", "q.yaml:1:10: spec version 2 is not supported"),
    "not-a-mapping": ("- 1\n- 2\n", "q.yaml:1:1: the spec must be a mapping"),
    "negative-scale": (
        "version: 1\ndefaults: {observer: fixed, scale: -0.1, zero_point: 0}\n",
        "q.yaml:2:36: scale must be greater than 0, got -0.1",
    ),
    "zero-scale": (
        "version: 1\ndefaults: {observer: fixed, scale: 0, zero_point: 0}\n",
        "q.yaml:2:36: scale must be greater than 0, got 0",
    ),
    "nan-scale": (
        "version: 1\ndefaults: {observer: fixed, scale: .nan, zero_point: 0}\n",
        "q.yaml:2:36: scale must be a finite number",
    ),
    "scale-list-item": (
        "version: 1\ndefaults: {observer: fixed, scale: [0.1, -1], zero_point: 0}\n",
        "q.yaml:2:42: scale must be greater than 0, got -1",
    ),
    "empty-list": (
        "version: 1\ndefaults: {observer: fixed, scale: [], zero_point: 0}\n",
        "q.yaml:2:36: scale must not be an empty list",
    ),
    "rule-without-match": (
        "version: 1\nrules:\n  - {dtype: qint8}\n",
        "q.yaml:3:5: a rule needs 'match",
    ),
    "merge-key": ("version: 1\nbase: &b {dtype: qint8}\n", "q.yaml:2:1: unknown key 'base'"),
    "merge-into-defaults": (
        "version: 1\ndefaults:\n  <<: {dtype: qint8}\n",
        "q.yaml:3:3: merge keys",
    ),
    "percentile-range": (
        "version: 1\ndefaults: {percentile: 120}\n",
        "q.yaml:2:24: percentile must be at most 100",
    ),
    "tagged-list": (
        "version: 1\nrules: !!python/tuple [{match: x}]\n",
        "q.yaml:2:8: tag 'tag:yaml.org,2002:python/tuple' is not allowed in a spec",
    ),
    "bool-as-int": (
        "version: 1\ndefaults: {axis: true}\n",
        "q.yaml:2:18: axis must be an integer, got True",
    ),
}


@pytest.mark.parametrize(("text", "message"), BAD_SPECS.values(), ids=BAD_SPECS.keys())
def test_bad_specs_name_file_line_and_column(text, message):
    with pytest.raises(SpecError, match=message) as info:
        parse_spec(text, "q.yaml")
    assert "\n" not in str(info.value)


def test_alias_bombs_are_refused_without_expanding_them():
    levels = ["&a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    for level in "bcdefghi":
        prev = chr(ord(level) - 1)
        levels.append(f"&{level} [{', '.join(['*' + prev] * 10)}]")
    text = f"version: 1\ndefaults:\n  scale: [{', '.join(levels)}]\n"
    with pytest.raises(SpecError, match=r"q.yaml:3:11: expected a single value here"):
        parse_spec(text, "q.yaml")


def test_specs_with_too_many_values_are_refused():
    text = "version: 1\nrules: [&r {match: x}" + ", *r" * 40_000 + "]\n"
    with pytest.raises(SpecError, match="more than 100000 values"):
        parse_spec(text, "q.yaml")


def test_files_that_are_not_specs(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_bytes(b"# " + b"x" * (5 * 1024 * 1024) + b"\n")
    with pytest.raises(SpecError, match=r"big.yaml: too large for a spec"):
        load_spec(big)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"version: 1\n# caf\xe9\n")
    with pytest.raises(SpecError, match=r"latin.yaml:2:1: the spec is not UTF-8"):
        load_spec(latin)
    with pytest.raises(SpecError, match="no such spec file"):
        load_spec(tmp_path / "missing.yaml")
    with pytest.raises(SpecError, match="is a directory"):
        load_spec(tmp_path)


RESOLVE_ERRORS = {
    "rule-matches-nothing": (
        "version: 1\nrules:\n  - match: decodr\n",
        "q.yaml:3:12: rule match 'decodr' matches no recurrent module; found: enc, dec",
    ),
    "weight-glob-matches-nothing": (
        "version: 1\nrules:\n  - match: dec\n    weights:\n      weight_hr: {dtype: quint8}\n",
        "q.yaml:5:7: weights.weight_hr matches no weight of 'dec'",
    ),
    "unknown-module-facts": (
        "version: 1\nmodules:\n  decoder: {batch_first: true}\n",
        "q.yaml:3:3: modules.decoder: no recurrent module at this path",
    ),
    "scale-without-fixed": (
        "version: 1\ndefaults: {scale: 0.1}\n",
        "q.yaml:2:19: enc.weight_ih: scale is only used with observer fixed",
    ),
    "fixed-without-scale": (
        "version: 1\ndefaults: {observer: fixed}\n",
        "q.yaml:2:22: enc.weight_ih: observer fixed needs a scale",
    ),
    "fixed-affine-without-zero-point": (
        "version: 1\ndefaults: {observer: fixed, qscheme: per_tensor_affine, scale: 0.1}\n",
        "q.yaml:2:64: enc.weight_ih: observer fixed with per_tensor_affine needs a zero_point",
    ),
}


@pytest.mark.parametrize(("text", "message"), RESOLVE_ERRORS.values(), ids=RESOLVE_ERRORS.keys())
def test_specs_that_do_not_fit_the_model(text, message):
    spec = parse_spec(text, "q.yaml")
    with pytest.raises(SpecError, match=message):
        resolve(spec, {"enc": ["weight_ih", "weight_hh"], "dec": ["weight_ih", "weight_hh"]})


def test_committed_schema_is_the_generated_one():
    committed = json.loads((CONFIGS / "refq.schema.json").read_text())
    assert committed == json_schema(), "run: refq schema > configs/refq.schema.json"


@pytest.mark.parametrize("preset", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_presets_load_and_point_editors_at_the_schema(preset):
    text = (CONFIGS / preset).read_text()
    assert text.startswith("# yaml-language-server: $schema=refq.schema.json")
    load_spec(CONFIGS / preset)
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(yaml.safe_load(text), json_schema())


def test_schema_and_validator_agree_on_unknown_keys():
    jsonschema = pytest.importorskip("jsonschema")
    doc = {"version": 1, "rules": [{"match": "x", "dtpye": "qint8"}]}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, json_schema())
    with pytest.raises(SpecError, match="unknown key 'dtpye' in a rule"):
        parse_spec(yaml.safe_dump(doc), "q.yaml")


def test_exponent_floats_read_as_numbers_like_editors_read_them():
    spec = parse_spec(
        "version: 1\ndefaults: {observer: fixed, qscheme: per_tensor_symmetric, scale: 1e-3}\n",
        "q.yaml",
    )
    assert spec.defaults["scale"].value == 0.001


def test_a_later_rule_can_unskip():
    spec = parse_spec(
        "version: 1\nrules:\n  - {match: '*', skip: true}\n  - {match: aux, skip: false}\n",
        "q.yaml",
    )
    plans = resolve(spec, {"aux": ["weight_ih"], "enc": ["weight_ih"]})
    assert not plans["aux"].skip and plans["enc"].skip


def test_a_module_at_the_root_is_named_root():
    spec = parse_spec(
        "version: 1\nrules:\n  - {match: <root>, dtype: quint8, qscheme: "
        "per_tensor_affine}\nmodules:\n  <root>: {batch_first: true}\n",
        "q.yaml",
    )
    plans = resolve(spec, {"": ["weight_ih_l0"]}, {"": "LSTM"})
    assert plans[""].weights["weight_ih_l0"].dtype == "quint8"
    assert plans[""].facts["batch_first"].value is True


@pytest.mark.parametrize(
    ("facts", "float_type", "message"),
    [
        (
            "nonlinearity: relu",
            "LSTM",
            "q.yaml:3:21: modules.m.nonlinearity does not apply to LSTM",
        ),
        (
            "batch_first: true",
            "GRUCell",
            "q.yaml:3:20: modules.m.batch_first does not apply to GRUCell",
        ),
        ("dropout: 0.1", "RNNCell", "modules.m.dropout does not apply to RNNCell"),
    ],
)
def test_module_facts_must_fit_the_module_type(facts, float_type, message):
    spec = parse_spec(f"version: 1\nmodules:\n  m: {{{facts}}}\n", "q.yaml")
    with pytest.raises(SpecError, match=message):
        resolve(spec, {"m": ["weight_ih"]}, {"m": float_type})


def test_strip_prefix_is_read_checked_and_recorded():
    spec = parse_spec("version: 1\nstrip_prefix: model.\n", "q.yaml")
    assert spec.strip_prefix == "model." and spec.to_dict()["strip_prefix"] == "model."
    assert "strip_prefix" not in parse_spec("version: 1\n", "q.yaml").to_dict()  # bytes as before
    assert spec.stripping("model") is spec and spec.stripping(None) is spec
    with pytest.raises(SpecError, match=r"^q.yaml:2:15: strip_prefix must be non-empty text"):
        parse_spec("version: 1\nstrip_prefix: ''\n", "q.yaml")
    with pytest.raises(
        SpecError, match=r"^q.yaml:2:15: strip_prefix must be non-empty text, got 3"
    ):
        parse_spec("version: 1\nstrip_prefix: 3\n", "q.yaml")
    with pytest.raises(
        SpecError, match=r"strip_prefix='module.': the spec q.yaml says strip_prefix: model."
    ):
        spec.stripping("module.")
