"""Everyday messages: a checkpoint given where an artifact belongs, and counts in words."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from refq_cli import load_artifact
from refq_cli.cli.app import app
from refq_cli.errors import ArtifactError


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def cell_state(*names):
    return {
        f"{name}.{k}": v for name in names for k, v in torch.nn.LSTMCell(4, 3).state_dict().items()
    }


def zip_checkpoint(path):
    torch.save(cell_state("cell"), path)


def legacy_checkpoint(path):
    torch.save(cell_state("cell"), path, _use_new_zipfile_serialization=False)


def torchscript_archive(path):
    torch.jit.save(torch.jit.script(torch.nn.LSTMCell(4, 3)), str(path))


def plain_safetensors(path):
    save_file(cell_state("cell"), str(path))


CHECKPOINTS = {
    "torch-save-zip": (
        zip_checkpoint,
        "model.pt",
        "looks like a PyTorch checkpoint (a torch.save or TorchScript zip)",
    ),
    "torch-save-legacy": (
        legacy_checkpoint,
        "model.pt",
        "looks like a PyTorch checkpoint (a legacy torch.save pickle)",
    ),
    "torchscript": (
        torchscript_archive,
        "model.pt",
        "looks like a PyTorch checkpoint (a torch.save or TorchScript zip)",
    ),
    "plain-safetensors": (plain_safetensors, "model.safetensors", "not a refq artifact"),
}


@pytest.fixture(params=list(CHECKPOINTS), ids=list(CHECKPOINTS))
def checkpoint(request, tmp_path):
    make, name, says = CHECKPOINTS[request.param]
    path = tmp_path / name
    make(path)
    return path, says


def test_inspecting_a_checkpoint_says_to_convert_it(checkpoint):
    path, says = checkpoint
    result = invoke("inspect", path)
    assert result.exit_code == 2
    line = result.stderr.strip()
    assert "\n" not in line and line.startswith(f"refq: error: {path}: ")
    assert says in line and "not a refq artifact" in line
    assert "`refq convert FILE --qconfig SPEC`" in line
    assert "`refq init-config FILE`" in line
    assert "a header of" not in line and len(line) < len(str(path)) + 220


def test_loading_a_checkpoint_says_to_convert_it(checkpoint):
    path, says = checkpoint
    with pytest.raises(ArtifactError) as info:
        load_artifact(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and says in message
    assert "not a refq artifact" in message and "`refq convert " in message


def test_diff_and_verify_say_it_too(tmp_path):
    path = tmp_path / "model.pt"
    zip_checkpoint(path)
    for args in (("inspect", "--diff", path, path), ("verify", path, "--against", path)):
        result = invoke(*args)
        assert result.exit_code == 2, result.output
        line = result.stderr.strip()
        assert "looks like a PyTorch checkpoint" in line and "`refq convert " in line, line


def test_other_files_are_still_no_safetensors_files(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not a model at all")
    result = invoke("inspect", path)
    assert result.exit_code == 2
    assert "not a safetensors file" in result.stderr and "checkpoint" not in result.stderr


ONE_FLOAT = "version: 1\nrules:\n  - {match: cell, weights: {weight_hh: {qscheme: none}}}\n"


@pytest.mark.parametrize(
    ("spec", "count"),
    [(ONE_FLOAT, "1 weight quantized"), ("version: 1\n", "2 weights quantized")],
    ids=["one", "two"],
)
def test_convert_counts_weights_in_words(tmp_path, spec, count):
    source = tmp_path / "model.pt"
    zip_checkpoint(source)
    q = tmp_path / "q.yaml"
    q.write_text(spec)
    result = invoke("convert", source, "-q", q)
    assert result.exit_code == 0, result.output
    assert f"{source.with_name('model.refq.safetensors')}: {count}, worst SQNR" in result.stdout
    markdown = source.with_name("model.refq.report.md").read_text()
    number, _, _ = count.partition(" ")
    noun = "weight" if number == "1" else "weights"
    assert f" dB over {number} quantized {noun}\n" in markdown


@pytest.mark.parametrize(
    ("names", "count"),
    [(("cell",), "1 recurrent module."), (("a", "b"), "2 recurrent modules.")],
    ids=["one", "two"],
)
def test_init_config_counts_modules_in_words(tmp_path, names, count):
    source = tmp_path / "model.pt"
    torch.save(cell_state(*names), source)
    result = invoke("init-config", source)
    assert result.exit_code == 0, result.output
    first = result.stdout.splitlines()[1]
    assert first.startswith("# refq spec for model.pt (sha256 ") and first.endswith(f": {count}")


def test_plural():
    from refq_cli.pipeline.report import plural

    assert [plural(n, "weight") for n in (0, 1, 2)] == ["0 weights", "1 weight", "2 weights"]
