"""What refq prints about hostile input: one escaped line of bounded length, exit 2, and strict
JSON; crafted specs and artifact metadata are refused before anything uses them."""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import typer
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from refq_cli.cli.app import app, reporting_errors
from refq_cli.errors import ArtifactError, RefqError, SpecError
from refq_cli.io.header import read_header
from refq_cli.pipeline.artifact import load_artifact
from refq_cli.pipeline.convert import convert_checkpoint as convert
from refq_cli.pipeline.inspect import describe_artifact
from refq_cli.spec.spec import MODULE_FIELDS, QPARAM_FIELDS, parse_spec
from tests.checkpoints import write
from tests.scripts import run_refq

HOSTILE = [
    "\n",
    "\r",
    "\x1b",
    "\x07",
    "\x00",
    "\x7f",
    "\x85",
    "\x9b",
    "\u2028",
    "\u2029",
    "\u202e",
    "\u2066",
    "\u200f",
    "\u061c",
    "\ufeff",
]


def one_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert not any(c in stderr.rstrip("\n") for c in HOSTILE), ascii(stderr)
    return lines[0]


def refused(result, pattern: str = "") -> str:
    """The one error line of a CliRunner or subprocess result, which must exit 2."""
    code = getattr(result, "exit_code", getattr(result, "returncode", None))
    assert code == 2, (code, result.stderr)
    line = one_line(result.stderr)
    assert line.startswith("refq: error: "), line
    assert re.search(pattern, line), line
    return line


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


# --- printing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("char", HOSTILE, ids=[ascii(c) for c in HOSTILE])
def test_control_characters_are_escaped(char):
    from refq_cli.errors import printable

    text = printable(f"key{char}::error::injected")
    assert char not in text and text.startswith("key\\") and text.endswith("::error::injected")
    assert len(text.splitlines()) == 1


def test_printable_text_is_left_as_it_is():
    from refq_cli.errors import printable

    for text in ("plain 'quoted' \\x1b", "na\u00efve \u4e2d\u6587", repr("a\nb")):
        assert printable(text) == text


def test_long_messages_keep_their_ends_and_say_how_much_was_cut():
    from refq_cli.errors import printable

    text = "start " + "x" * 3_000_000 + "\x1b" * 1000 + " end"
    line = printable(text)
    assert len(line) < 2100 and line.startswith("start ") and line.endswith(" end")
    cut = int(re.search(r"\[\.\.\. (\d+) characters cut \.\.\.\]", line).group(1))
    kept = line.replace(f" [... {cut} characters cut ...] ", "")
    assert cut > 2_999_000 and "\x1b" not in line
    assert len(kept.replace("\\x1b", "\x1b")) + cut == len(text)


def test_every_error_line_is_escaped_and_bounded():
    """The one place errors are printed, for refq's errors and for bugs alike."""

    def fail(kind: str) -> None:
        message = "bad key 'k'\n::error::injected\x1b]8;;http://x\x07" + "y" * 3_000_000
        raise (RefqError if kind == "refq" else ValueError)(message)

    one = typer.Typer()
    one.command()(reporting_errors(fail))
    for kind, code in (("refq", 2), ("bug", 1)):
        result = CliRunner().invoke(one, [kind])
        assert result.exit_code == code
        line = one_line(result.stderr)
        assert len(line) < 2300 and "characters cut" in line
        assert "\\n::error::injected\\x1b]8;;http://x\\x07" in line, line


def test_a_path_cannot_inject_a_workflow_command(tmp_path):
    path = tmp_path / "model\n::error file=x::injected\u2028\x1b[2J.safetensors"
    path.write_bytes(b"not a safetensors file")
    for args in (
        ("inspect", path),
        ("inspect", "--json", path),
        ("verify", path, "--against", path),
    ):
        line = refused(run_refq(*args), "not a safetensors file")
        assert "\\n::error file=x::injected\\u2028\\x1b[2J" in line


def test_strict_json_maps_nan_and_infinity_to_null():
    from refq_cli.errors import strict_json

    text = strict_json({"a": [float("nan"), 1.5, (float("inf"), -float("inf"))]})
    assert json.loads(text, parse_constant=_no_constants) == {"a": [None, 1.5, [None, None]]}


def _no_constants(name):
    raise AssertionError(f"{name} in JSON")


# --- numbers in specs -------------------------------------------------------------------------

NUMERIC = {
    **{k: f"defaults: {{{k}: VALUE}}" for k, f in QPARAM_FIELDS.items() if f.kind != "enum"},
    **{
        k: f"modules: {{enc: {{{k}: VALUE}}}}"
        for k, f in MODULE_FIELDS.items()
        if f.kind not in ("enum", "bool")
    },
}
LISTS = {k for k, f in QPARAM_FIELDS.items() if f.kind in ("numbers", "ints")}  # one per channel
HUGE = "9" * 400


def test_the_table_holds_every_numeric_key_of_the_schema():
    schema = json.loads((Path(__file__).parents[2] / "configs" / "refq.schema.json").read_text())
    numeric = {
        k
        for group in (schema["$defs"]["qparams"], schema["$defs"]["module"])
        for k, v in group["properties"].items()
        if "number" in json.dumps(v) or "integer" in json.dumps(v)
    }
    assert numeric == set(NUMERIC)


HUGE_VALUES = [
    (key, value)
    for key in NUMERIC
    for value in (
        HUGE,
        f"-{HUGE}",
        "1e400",
        *([f"[{HUGE}]"] if key in LISTS else []),
    )
]


@pytest.mark.parametrize(("key", "value"), HUGE_VALUES)
def test_huge_numbers_are_refused_at_their_place(key, value):
    text = "version: 1\n" + NUMERIC[key].replace("VALUE", value) + "\n"
    column = text.splitlines()[1].index(value.lstrip("[")) + 1
    with pytest.raises(SpecError, match=rf"^q\.yaml:2:{column}: {key} must be ") as refusal:
        parse_spec(text, "q.yaml")
    assert len(str(refusal.value)) < 200


def test_a_huge_percentile_through_the_cli(tmp_path):
    (tmp_path / "q.yaml").write_text(f"version: 1\ndefaults: {{percentile: {HUGE}}}\n")
    result = run_refq("convert", tmp_path / "none.pt", "-q", "q.yaml", cwd=tmp_path)
    refused(result, r"q\.yaml:2:24: percentile must be a finite number, got 9+\.\.\.9+$")


# --- artifact metadata ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """A converted artifact and its checkpoint (an LSTM at 'encoder', a cell at 'gate', ...)."""
    folder = tmp_path_factory.mktemp("real")
    spec = folder / "q.yaml"
    spec.write_text(
        "version: 1\nmodules:\n  aux: {nonlinearity: relu}\n"
        "rules:\n  - {match: gate, qscheme: per_tensor_affine, dtype: quint8}\n"
    )
    source = write(folder, "pt")
    path = folder / "a.refq.safetensors"
    convert(source, spec, path)
    return path, source


_PLAIN = ("format", "refq.format_version")  # metadata stored as text, not JSON


class _Raw(str):
    """A metadata value to store as it is, not as JSON."""


def crafted(real_path: Path, out: Path, change, tensors=None) -> Path:
    """A copy of the artifact with ``change`` applied to its parsed metadata (in place)."""
    metadata = {k: v if k in _PLAIN else json.loads(v) for k, v in read_header(real_path).items()}
    change(metadata)
    strings = {
        k: v if k in _PLAIN or isinstance(v, _Raw) else json.dumps(v) for k, v in metadata.items()
    }
    save_file(tensors if tensors is not None else load_file(str(real_path)), str(out), strings)
    return out


def _set(*keys_and_value):
    *keys, value = keys_and_value

    def change(metadata):
        target = metadata
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value

    return change


LSTM = ("refq.modules", "encoder")
W = (*LSTM, "weights", "weight_ih_l0")
WRONG = {
    "source a list": (_set("refq.source", ["model.pt"]), r"refq\.source must be a JSON object"),
    "source name a number": (_set("refq.source", "name", 3), r"refq\.source\.name must be text"),
    "producer text": (_set("refq.producer", _Raw("refq 0.1")), r"refq\.producer is not JSON"),
    "spec a number": (_set("refq.spec", 1), r"refq\.spec must be a JSON object"),
    "modules a list": (_set("refq.modules", []), r"refq\.modules must be a JSON object"),
    "modules not JSON": (_set("refq.modules", _Raw("{nope")), r"refq\.modules is not JSON"),
    "modules missing": (lambda m: m.pop("refq.modules"), r"refq\.modules is missing"),
    "module a list": (_set(*LSTM, [1]), r"\['encoder'\] must be a JSON object"),
    "float_type an integer": (_set(*LSTM, "float_type", 3), r"float_type must be one of RNNCell"),
    "float_type unknown": (_set(*LSTM, "float_type", "Linear"), r"float_type must be one of"),
    "float_dtype a function": (_set(*LSTM, "float_dtype", "save"), r"float_dtype must be one of"),
    "is_decomposed text": (_set(*LSTM, "is_decomposed", "no"), r"is_decomposed must be true or"),
    "config missing": (lambda m: m["refq.modules"]["encoder"].pop("config"), r"config is missing"),
    "input_size text": (_set(*LSTM, "config", "input_size", "6"), r"input_size must be an integer"),
    "hidden_size a float": (_set(*LSTM, "config", "hidden_size", 8.0), r"hidden_size must be an"),
    "hidden_size 0": (_set(*LSTM, "config", "hidden_size", 0), r"hidden_size must be an integer"),
    "hidden_size huge": (_set(*LSTM, "config", "hidden_size", 10**400), r"hidden_size must be"),
    "num_layers huge": (_set(*LSTM, "config", "num_layers", 10**15), r"num_layers is 10+, but"),
    "bias text": (_set(*LSTM, "config", "bias", "yes"), r"bias must be true or false"),
    "dropout text": (_set(*LSTM, "config", "dropout", "0"), r"dropout must be a number from 0"),
    "dropout 2": (_set(*LSTM, "config", "dropout", 2), r"dropout must be a number from 0 to 1"),
    "unknown config key": (_set(*LSTM, "config", "mode", "x"), r"has 'mode', which a LSTM does"),
    "proj_size too big": (_set(*LSTM, "config", "proj_size", 8), r"proj_size must be smaller"),
    "nonlinearity 1": (
        _set("refq.modules", "aux", "config", "nonlinearity", 1),
        r"nonlinearity must be one of tanh, relu",
    ),
    "config not the tensors'": (
        _set(*LSTM, "config", "input_size", 7),
        r"tensor 'encoder\.weight_ih_l0' has shape \(32, 6\), but .*needs \(32, 7\)",
    ),
    "weights a list": (_set(*LSTM, "weights", []), r"weights must be a JSON object"),
    "weight entry text": (_set(*W, "x"), r"\['weight_ih_l0'\] must be a JSON object"),
    "weight missing": (
        lambda m: m["refq.modules"]["encoder"]["weights"].pop("weight_ih_l0"),
        r"weights names \[.*\], but its type and config have weights weight_ih_l0",
    ),
    "qscheme a number": (_set(*W, "qscheme", 5), r"qscheme must be one of"),
    "dtype unknown": (_set(*W, "dtype", "int3"), r"dtype must be one of qint8"),
    "axis text": (_set(*W, "axis", "0"), r"axis must be null or an integer"),
    "axis past the weight": (_set(*W, "axis", 2), r"axis 2 is past its 2 dimensions"),
    "quant_min a float": (_set(*W, "quant_min", -128.0), r"quant_min must be a 64-bit integer"),
    "quant_max huge": (_set(*W, "quant_max", 10**400), r"quant_max must be a 64-bit integer"),
    "sqnr_db text": (_set(*W, "sqnr_db", "high"), r"sqnr_db must be null or a finite number"),
    "sqnr_db NaN": (_set(*W, "sqnr_db", float("nan")), r"refq\.modules is not JSON"),
    "observer a list": (_set(*W, "observer", ["minmax"]), r"observer must be one of"),
    "key with a newline": (
        _set(*LSTM, "config", "x\n::error::y", 1),
        r"has 'x\\n::error::y', which a LSTM",
    ),
}


@pytest.fixture(scope="module")
def wrong(real, tmp_path_factory):
    folder = tmp_path_factory.mktemp("wrong")
    return {
        case: crafted(real[0], folder / f"{n}.refq.safetensors", change)
        for n, (case, (change, _)) in enumerate(WRONG.items())
    }


@pytest.mark.parametrize("case", WRONG)
def test_wrong_metadata_is_refused_by_every_reader(real, wrong, case):
    path, pattern = wrong[case], WRONG[case][1]
    for read in (load_artifact, describe_artifact):
        with pytest.raises(ArtifactError, match=pattern) as refusal:
            read(path)
        assert str(path) in str(refusal.value) and "\n" not in str(refusal.value)
    refused(invoke("inspect", path), pattern)
    refused(invoke("inspect", "--json", path), pattern)
    refused(invoke("inspect", "--diff", real[0], path), pattern)
    refused(invoke("verify", path, "--against", real[1]), pattern)


def test_the_metadata_is_checked_by_the_installed_script(real, wrong):
    refused(run_refq("inspect", wrong["source a list"]), r"refq\.source must be a JSON object")
    refused(run_refq("verify", wrong["float_type an integer"], "--against", real[1]), "float_type")


def test_a_config_far_larger_than_the_tensors_is_refused_before_any_module_is_built(real, tmp_path):
    """The metadata claims an LSTM of 40000 inputs and 10000 hidden units, 8 GB of float
    weights; the tensors are the small real ones. Run under a 3 GB address-space limit."""

    def huge(metadata):
        metadata["refq.modules"]["encoder"]["config"].update(input_size=40000, hidden_size=10000)

    path = crafted(real[0], tmp_path / "huge.refq.safetensors", huge)
    code = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))\n"
        "from refq_cli.cli.app import main\n"
        "sys.argv = ['refq', *sys.argv[1:]]\n"
        "main()\n"
    )
    for args in (["verify", path, "--against", real[1]], ["inspect", path]):
        result = subprocess.run(
            [sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True
        )
        refused(result, r"tensor 'encoder\.weight_ih_l0' has shape \(32, 6\), but the metadata")


def test_inspect_json_is_strict_when_scales_are_not_finite(real, tmp_path):
    tensors = load_file(str(real[0]))
    tensors["gate.weight_ih_scale"] = torch.tensor(float("nan"))
    tensors["encoder.weight_hh_l0_scale"][0] = float("inf")
    path = crafted(real[0], tmp_path / "nan.refq.safetensors", lambda m: None, tensors)
    shown = invoke("inspect", "--json", "--channels", path)  # refused, as load_artifact does
    assert shown.exit_code == 2 and "holds a value that is not positive and finite" in shown.output
    result = invoke("inspect", "--json", "--diff", real[0], path)
    assert result.exit_code == 1, result.output
    data = json.loads(result.stdout, parse_constant=_no_constants)
    assert "null" in result.stdout and data


def test_names_with_markup_and_controls_are_shown_as_written(real, tmp_path):
    tensors = {**load_file(str(real[0])), "x[/bold]\n::error::y[red]\x1b[2J": torch.zeros(1)}
    path = crafted(real[0], tmp_path / "names.refq.safetensors", _set("refq.source", "name", "[/]"))
    path = crafted(path, tmp_path / "names2.refq.safetensors", lambda m: None, tensors)
    result = invoke("inspect", "--all", path)
    assert result.exit_code == 0, result.output
    assert "source: [/] (state_dict)" in result.stdout
    assert "  x[/bold]\\n::error::y[red]\\x1b[2J: F32 1" in result.stdout
    assert not any(line.startswith("::") for line in result.stdout.splitlines())


def test_duplicate_metadata_in_a_crafted_header_is_refused_by_the_cli(tmp_path):
    text = b'{"__metadata__":{"format":"refq"},"__metadata__":{"format":"refq"}}'
    path = tmp_path / "twice.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text)
    refused(invoke("inspect", path), "its header has two __metadata__")
