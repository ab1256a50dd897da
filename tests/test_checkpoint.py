"""Reading checkpoints and finding their recurrent modules."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from refq_cli.errors import CheckpointError, SpecError, naming_flags
from refq_cli.io.checkpoint import load_checkpoint
from refq_cli.io.header import read_header
from refq_cli.io.recurrent import find_recurrent_modules
from refq_cli.pipeline.convert import convert_checkpoint as convert
from tests.checkpoints import FORMATS, silero_file, speech_state, write

SPEECH_MODULES = {
    "encoder": (
        "LSTM",
        {
            "input_size": 6,
            "hidden_size": 8,
            "num_layers": 2,
            "bias": True,
            "bidirectional": True,
            "proj_size": 3,
        },
    ),
    "context": (
        "GRU",
        {"input_size": 6, "hidden_size": 5, "num_layers": 1, "bias": False, "bidirectional": False},
    ),
    "aux": (
        "RNN",
        {"input_size": 6, "hidden_size": 4, "num_layers": 1, "bias": True, "bidirectional": False},
    ),
    "decoder.cell": ("LSTMCell", {"input_size": 6, "hidden_size": 7, "bias": True}),
    "gate": ("GRUCell", {"input_size": 6, "hidden_size": 5, "bias": True}),
    "tanh_cell": ("RNNCell", {"input_size": 6, "hidden_size": 4, "bias": False}),
}


@pytest.mark.parametrize("kind", [k for k in FORMATS if k != "torchscript"])
def test_state_dict_formats_find_every_recurrent_module(tmp_path, kind):
    ckpt = load_checkpoint(write(tmp_path, kind))
    assert ckpt.format == ("safetensors" if kind == "safetensors" else "state_dict")
    found = {p: (m.float_type, m.config) for p, m in ckpt.modules.items()}
    assert found == SPEECH_MODULES
    assert sorted(ckpt.other_tensor_names) == [
        "frontend.bias",
        "frontend.weight",
        "head.bias",
        "head.weight",
    ]
    assert len(ckpt.sha256) == 64


def test_built_modules_carry_the_checkpoint_weights(tmp_path):
    ckpt = load_checkpoint(write(tmp_path, "pt"))
    lstm = ckpt.modules["encoder"].build(ckpt.tensors, {})
    assert isinstance(lstm, nn.LSTM) and lstm.proj_size == 3
    assert torch.equal(lstm.weight_hr_l1_reverse, ckpt.tensors["encoder.weight_hr_l1_reverse"])
    rnn = ckpt.modules["aux"].build(ckpt.tensors, {"nonlinearity": "relu"})
    assert rnn.nonlinearity == "relu"


def test_torchscript_archive_with_a_nested_module(tmp_path):
    ckpt = load_checkpoint(write(tmp_path, "torchscript"))
    assert ckpt.format == "torchscript"
    assert {p: m.float_type for p, m in ckpt.modules.items()} == {"_model.decoder.rnn": "LSTMCell"}


def test_pickled_modules_need_trust(tmp_path):
    path = write(tmp_path, "pickle")
    with pytest.raises(CheckpointError, match=r"refused to unpickle .*pass trust_code=True only"):
        load_checkpoint(path)
    with naming_flags(), pytest.raises(CheckpointError, match=r"pass --trust-code only for"):
        load_checkpoint(path)
    ckpt = load_checkpoint(path, trust_code=True)
    assert ckpt.format == "pickle" and set(ckpt.modules) == set(SPEECH_MODULES)


class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_pickles_that_would_run_code_are_refused_and_never_run(tmp_path, monkeypatch, zip_format):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save(
        {"weight_ih": torch.zeros(4, 1), "x": RunsCode()},
        path,
        _use_new_zipfile_serialization=zip_format,
    )
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(
        CheckpointError, match=r"refused to unpickle Python objects \(globals (posix|os)\.system\)"
    ):
        load_checkpoint(path)
    assert not (tmp_path / "PWNED").exists()


def test_real_trained_lstm_cell_in_safetensors():
    ckpt = load_checkpoint(silero_file("silero_vad_16k.safetensors"))
    assert {p: m.describe() for p, m in ckpt.modules.items()} == {
        "lstm_cell": "LSTMCell(input_size=128, hidden_size=128, bias=True)"
    }


def test_real_torchscript_archive_with_nested_rnn():
    ckpt = load_checkpoint(silero_file("silero_vad.jit"))
    assert "_model.decoder.rnn" in ckpt.modules
    assert ckpt.modules["_model.decoder.rnn"].float_type == "LSTMCell"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "the file is empty"),
        (b"hello world, not a model", "not a checkpoint refq can read"),
        (b"PK\x03\x04garbage", "cannot read the checkpoint"),
    ],
    ids=["empty", "text", "broken-zip"],
)
def test_unreadable_files(tmp_path, content, message):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_missing_and_directory_paths(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope\.pt: no such checkpoint file"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="is a directory"):
        load_checkpoint(tmp_path)


def test_a_file_without_a_state_dict(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match="holds no state_dict"):
        load_checkpoint(path)


def drop(state, key):
    return {k: v for k, v in state.items() if k != key}


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: drop(s, "encoder.weight_hh_l1"), "missing weight_hh_l1"),
        (
            lambda s: {**s, "context.weight_hh_l0": torch.zeros(10, 5)},
            r"weight_hh_l0 has 2 gates \(shape \(10, 5\)\)",
        ),
        (lambda s: {**s, "context.weight_hh_l0": torch.zeros(7, 5)}, "no whole number of gates"),
        (
            lambda s: {
                **drop(s, "context.weight_ih_l0"),
                "context.weight_hr_l0": torch.zeros(5, 5),
                "context.weight_ih_l0": torch.zeros(15, 6),
            },
            "weight_hr .projections. belongs to an LSTM",
        ),
        (lambda s: drop(s, "gate.bias_hh"), "lacks bias_hh"),
        (lambda s: drop(s, "gate.weight_ih"), "lacks weight_ih"),
        (
            lambda s: {**s, "encoder.weight_ih_l0_reverse": torch.zeros(32, 5)},
            r"weight_ih_l0_reverse: expected \(32, 6\), got \(32, 5\)",
        ),
    ],
    ids=[
        "missing-layer-weight",
        "two-gates",
        "fractional-gates",
        "hr-without-lstm",
        "half-the-biases",
        "cell-without-weight_ih",
        "reverse-shape",
    ],
)
def test_inconsistent_recurrent_keys_are_named(mutate, message):
    state = mutate(speech_state())
    with pytest.raises(CheckpointError, match=message):
        for module in find_recurrent_modules(state, "m.pt").values():
            module.build(state, {})


def test_a_bare_module_state_dict_sits_at_the_root():
    found = find_recurrent_modules(nn.GRU(3, 4, num_layers=3).state_dict())
    assert list(found) == [""] and found[""].config["num_layers"] == 3
    assert found[""].key("weight_ih_l0") == "weight_ih_l0"


def test_an_artifact_is_not_an_input(tmp_path):
    from refq_cli.io.safetensors_writer import write_safetensors

    path = tmp_path / "a.refq.safetensors"
    write_safetensors(path, {"w": torch.zeros(2)}, {"format": "refq"})
    with pytest.raises(CheckpointError, match="already a refq artifact"):
        load_checkpoint(path)


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


linux_only = pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc")


@linux_only
@pytest.mark.parametrize("kind", ["pt", "safetensors", "pickle"])
def test_released_tensors_leave_memory_and_keep_their_values(tmp_path, kind):
    from safetensors.torch import save_file

    path = tmp_path / f"big.{kind}"
    tensors = {"a": torch.arange(8 << 20, dtype=torch.float32), "b": torch.ones(3)}
    if kind == "pickle":  # a whole module, pickled: read with trust, still mapped
        module = nn.Module()
        for name, tensor in tensors.items():
            module.register_buffer(name, tensor)
        torch.save(module, path)
    else:
        torch.save(tensors, path) if kind == "pt" else save_file(tensors, path)
    checkpoint = load_checkpoint(path, trust_code=kind == "pickle")
    assert checkpoint.format == {"pt": "state_dict"}.get(kind, kind)
    a = checkpoint.tensors["a"]
    total = float(a.sum(dtype=torch.float64))  # reads every page of the 32 MiB tensor
    with open("/proc/self/maps") as maps:  # read here, not through the code under test
        mapped = str(path.resolve()) in maps.read()
    if kind == "safetensors" and not mapped:  # torch.load always maps zip files
        pytest.skip("this safetensors reads files into memory: nothing to release")
    before = resident_bytes()
    checkpoint.release([a])
    assert before - resident_bytes() > 24 << 20
    assert float(a.sum(dtype=torch.float64)) == total  # read back from the file
    assert torch.equal(checkpoint.tensors["b"], torch.ones(3))


@linux_only
def test_memory_that_is_not_mapped_from_the_file_is_never_released(tmp_path):
    path = tmp_path / "big.pt"
    torch.save({"a": torch.zeros(8 << 20)}, path)
    checkpoint = load_checkpoint(path)
    other = torch.arange(
        8 << 20, dtype=torch.float32
    )  # anonymous memory: released, it would read 0
    checkpoint.release([other])
    assert torch.equal(other, torch.arange(8 << 20, dtype=torch.float32))


def pickled_rnns(tmp_path) -> Path:
    model = nn.Module()
    model.rnn = nn.RNN(4, 3, nonlinearity="relu", batch_first=True)
    model.gru = nn.GRU(4, 3, num_layers=2, dropout=0.25)
    model.cell = nn.RNNCell(4, 3, nonlinearity="relu")
    path = tmp_path / "module.pt"
    torch.save(model, path)
    return path


def test_a_pickled_modules_facts_are_taken_from_it(tmp_path):
    checkpoint = load_checkpoint(pickled_rnns(tmp_path), trust_code=True)
    recorded = {p: m.recorded for p, m in checkpoint.modules.items()}
    assert recorded == {
        "rnn": {"batch_first": True, "dropout": 0.0, "nonlinearity": "relu"},
        "gru": {"batch_first": False, "dropout": 0.25},
        "cell": {"nonlinearity": "relu"},
    }
    built = checkpoint.modules["rnn"].build(checkpoint.tensors, {})
    assert (built.nonlinearity, built.batch_first) == ("relu", True)


def test_facts_that_contradict_the_file_are_refused(tmp_path):
    path = pickled_rnns(tmp_path)
    spec = tmp_path / "q.yaml"
    spec.write_text("version: 1\nmodules:\n  rnn: {nonlinearity: tanh}\n")
    with pytest.raises(SpecError, match=r"q.yaml:3:.*nonlinearity is 'tanh', but .* records "):
        convert(path, spec, tmp_path / "x.refq.safetensors", trust_code=True)
    checkpoint = load_checkpoint(path, trust_code=True)
    with pytest.raises(CheckpointError, match="given batch_first=False, but the file's module"):
        checkpoint.modules["rnn"].build(checkpoint.tensors, {"batch_first": False})


def test_a_converted_pickled_module_keeps_its_facts(tmp_path):
    spec = tmp_path / "q.yaml"
    spec.write_text("version: 1\n")
    out = tmp_path / "x.refq.safetensors"
    convert(pickled_rnns(tmp_path), spec, out, trust_code=True)
    config = json.loads(read_header(out)["refq.modules"])["rnn"]["config"]
    assert (config["nonlinearity"], config["batch_first"]) == ("relu", True)


class ScriptedRNNs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.RNN(4, 3, nonlinearity="relu", batch_first=True)
        self.gru = nn.GRU(4, 3, num_layers=2, dropout=0.25)
        self.cell = nn.RNNCell(4, 3, nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rnn(x)[0]


def test_a_torchscript_archives_facts_are_read_as_torch_jit_load_gives_them(tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.script(ScriptedRNNs()).save(str(path))
    safe, trusted = (load_checkpoint(path, trust_code=t) for t in (False, True))
    recorded = {p: m.recorded for p, m in safe.modules.items()}
    assert recorded == {p: m.recorded for p, m in trusted.modules.items()}
    assert recorded["rnn"] == {"batch_first": True, "dropout": 0.0, "nonlinearity": "relu"}
    assert recorded["gru"]["dropout"] == 0.25
    assert recorded["cell"] == {"nonlinearity": "relu"}


def test_silero_converts_to_the_same_bytes_as_with_torch_jit_load(tmp_path):
    source = silero_file("silero_vad.jit")
    spec = Path(__file__).resolve().parents[1] / "configs" / "int8-per-channel-symmetric.yaml"
    outputs = [tmp_path / f"{name}.refq.safetensors" for name in ("safe", "trusted")]
    for out, trust in zip(outputs, (False, True), strict=True):
        convert(source, spec, out, trust_code=trust)
    assert outputs[0].read_bytes() == outputs[1].read_bytes()


def test_assumed_facts_are_named_in_the_report_and_written_by_init_config(tmp_path):
    from refq_cli.pipeline.init_config import skeleton
    from refq_cli.pipeline.report import assumed_facts_warning

    path = write(tmp_path, "pt")
    spec = tmp_path / "q.yaml"
    spec.write_text("version: 1\nmodules:\n  aux: {nonlinearity: relu}\n")
    report = convert(path, spec, tmp_path / "x.refq.safetensors").report
    assert report["assumed_facts"]["encoder"] == {"batch_first": False, "dropout": 0.0}
    assert report["assumed_facts"]["aux"] == {"batch_first": False}  # one layer: no dropout
    assert report["assumed_facts"]["tanh_cell"] == {"nonlinearity": "tanh"}
    assert "decoder.cell" not in report["assumed_facts"]  # an LSTMCell: weights tell all
    line = assumed_facts_warning(report)
    assert "\n" not in line and "modules.encoder.batch_first: false" in line
    assert "modules.aux.nonlinearity" not in line  # the spec set it

    text = skeleton(load_checkpoint(path))
    assert '  # "encoder":\n    # batch_first: false  # PyTorch\'s default' in text
    assert '  # "tanh_cell":\n    # nonlinearity: "tanh"' in text
    recorded = skeleton(load_checkpoint(pickled_rnns(tmp_path), trust_code=True))
    assert '  "rnn":\n    nonlinearity: "relu"  # as the file records it' in recorded


def test_a_spec_init_config_wrote_for_a_pickled_module_converts(tmp_path):
    from refq_cli.pipeline.init_config import skeleton

    path = pickled_rnns(tmp_path)
    spec = tmp_path / "q.yaml"
    spec.write_text(skeleton(load_checkpoint(path, trust_code=True)))
    assert convert(path, spec, tmp_path / "x.refq.safetensors", trust_code=True).report


def test_an_apply_to_mismatch_of_a_fact_says_which_spec_key_fixes_it(tmp_path):
    from refq_cli.errors import ArtifactError
    from refq_cli.pipeline.artifact import load_artifact

    model = nn.Module()
    model.encoder = nn.LSTM(3, 4, batch_first=True)
    path = tmp_path / "m.pt"
    torch.save(model.state_dict(), path)
    spec = tmp_path / "q.yaml"
    spec.write_text("version: 1\n")
    convert(path, spec, tmp_path / "x.refq.safetensors")
    artifact = load_artifact(tmp_path / "x.refq.safetensors")
    with pytest.raises(
        ArtifactError,
        match=r"batch_first: model has True, artifact has False "
        r"\(set batch_first: true for this module under modules: in the spec\)",
    ):
        artifact.apply_to(model)


# --- wrapper prefixes (strip_prefix) -------------------------------------------------------------


def lightning_checkpoint(tmp_path: Path, prefix: str = "model.") -> Path:
    """What PyTorch Lightning saves: the module's state_dict under its attribute's prefix,
    with the training state beside it."""
    torch.manual_seed(0)
    model = nn.Module()
    model.lstm = nn.LSTM(3, 4, num_layers=2)
    model.head = nn.Linear(4, 2)
    state = {prefix + k: v for k, v in model.state_dict().items()}
    path = tmp_path / "epoch=3-step=90.ckpt"
    optimizer = {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 0.1}]}
    torch.save({"state_dict": state, "epoch": 3, "optimizer_states": [optimizer]}, path)
    return path


@pytest.mark.parametrize(("prefix", "given"), [("model.", "model."), ("model.", "model")])
def test_strip_prefix_takes_lightnings_prefix_off(tmp_path, prefix, given):
    path = lightning_checkpoint(tmp_path, prefix)
    assert set(load_checkpoint(path).modules) == {"model.lstm"}
    checkpoint = load_checkpoint(path, strip_prefix=given)
    assert {p: m.config["num_layers"] for p, m in checkpoint.modules.items()} == {"lstm": 2}
    assert list(checkpoint.tensors)[-2:] == ["head.weight", "head.bias"]  # in the file's order
    assert all(not k.startswith("model.") for k in checkpoint.tensors)


def test_strip_prefix_takes_ddps_prefix_off_and_keeps_other_keys(tmp_path):
    torch.manual_seed(0)
    state = {"module." + k: v for k, v in nn.GRU(3, 4).state_dict().items()}
    state["step_scale"] = torch.ones(1)
    path = tmp_path / "ddp.pt"
    torch.save(state, path)
    checkpoint = load_checkpoint(path, strip_prefix="module")
    assert list(checkpoint.modules) == [""]  # the wrapped module was the GRU itself
    assert "step_scale" in checkpoint.tensors and "weight_ih_l0" in checkpoint.tensors


def test_strip_prefix_also_moves_the_facts_a_file_records(tmp_path):
    wrapper = nn.Module()
    wrapper.model = nn.Module()
    wrapper.model.rnn = nn.RNN(4, 3, nonlinearity="relu", batch_first=True)
    wrapper.model.cell = nn.GRUCell(4, 3)
    path = tmp_path / "wrapped.pt"
    torch.save(wrapper, path)
    checkpoint = load_checkpoint(path, trust_code=True, strip_prefix="model.")
    assert set(checkpoint.modules) == {"rnn", "cell"}
    assert checkpoint.modules["rnn"].recorded == {
        "batch_first": True,
        "dropout": 0.0,
        "nonlinearity": "relu",
    }
    whole = nn.Module()
    whole.model = nn.RNN(4, 3, nonlinearity="relu")  # the wrapper's own module at the root
    torch.save(whole, path)
    checkpoint = load_checkpoint(path, trust_code=True, strip_prefix="model")
    assert checkpoint.modules[""].recorded["nonlinearity"] == "relu"


def test_strip_prefix_that_no_key_starts_with_names_what_they_start_with(tmp_path):
    path = write(tmp_path, "pt")
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(path, strip_prefix="model")
    assert str(caught.value) == (
        f"{path}: strip_prefix 'model.': no key starts with it; keys start with: frontend., "
        "encoder., context., aux., decoder., gate., tanh_cell., head."
    )
    with naming_flags(), pytest.raises(CheckpointError, match=r": strip_prefix 'model\.': no key"):
        load_checkpoint(path, strip_prefix="model")  # the same, from the spec or the flag
    torch.save({f"k{n}.w": torch.zeros(1) for n in range(30)}, path)
    with pytest.raises(CheckpointError, match=r"keys start with: k0\., .*k9\. and 20 more$"):
        load_checkpoint(path, strip_prefix="model")


def test_strip_prefix_that_makes_two_keys_one_is_refused(tmp_path):
    path = tmp_path / "two.pt"
    torch.save({"lstm.weight": torch.zeros(1), "model.lstm.weight": torch.ones(1)}, path)
    message = (
        rf"^{path}: strip_prefix 'model.': keys 'model.lstm.weight' and 'lstm.weight' would "
        r"both be 'lstm.weight'; the prefix cannot be taken off$"
    )
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path, strip_prefix="model.")
    torch.save({"model.lstm.weight": torch.ones(1), "lstm.weight": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path, strip_prefix="model.")
    torch.save({"model.": torch.ones(1), "model.x": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match=r"key 'model\.' would become empty"):
        load_checkpoint(path, strip_prefix="model.")


@pytest.mark.parametrize("given", ["", ".", ".."])
def test_an_empty_strip_prefix_is_refused_before_reading(tmp_path, given):
    with pytest.raises(CheckpointError, match=r"^strip_prefix='\.*': give the prefix the"):
        load_checkpoint(tmp_path / "missing.pt", strip_prefix=given)


def test_strip_prefix_applies_to_a_sharded_checkpoint(tmp_path):
    from tests.checkpoints import tagger_state, write_sharded

    state = {"model." + k: v for k, v in tagger_state().items()}
    index = write_sharded(tmp_path, "safetensors", state)
    checkpoint = load_checkpoint(index, strip_prefix="model.")
    assert list(checkpoint.modules) == ["lstm"] and "head.weight" in checkpoint.tensors


def test_verify_takes_off_the_prefix_the_conversion_took_off(tmp_path):
    from refq_cli.pipeline.verify import verify

    path = lightning_checkpoint(tmp_path)
    spec = tmp_path / "q.yaml"
    spec.write_text("version: 1\nstrip_prefix: model.\n")
    out = tmp_path / "x.refq.safetensors"
    assert list(convert(path, spec, out).modules) == ["lstm"]
    result = verify(out, path)
    assert result["source_matches"] and [m["path"] for m in result["modules"]] == ["lstm"]


def test_a_safetensors_file_whose_header_length_starts_like_a_pickle_is_read(tmp_path):
    # The header's length is its first byte: 0x80, as a legacy pickle's first byte is, for one
    # header size in 32; such files were refused as corrupt pickles.
    state = {k: v.contiguous() for k, v in nn.LSTM(8, 16).state_dict().items()}
    for extra in range(256):
        path = tmp_path / "st.safetensors"
        save_file(state, path, metadata={"format": "pt", "x": "a" * extra})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    assert load_checkpoint(path).format == "safetensors"


@pytest.mark.parametrize("key", ["model_state_dict", "module"])
def test_the_tutorial_and_deepspeed_layouts_are_read(tmp_path, key):
    torch.manual_seed(0)
    state = nn.LSTM(4, 6).state_dict()
    torch.save({"epoch": 5, key: state, "optimizer_state_dict": {"lr": 0.1}}, tmp_path / "c.pt")
    assert set(load_checkpoint(tmp_path / "c.pt").modules) == {""}


def test_a_file_without_a_state_dict_lists_its_keys(tmp_path):
    torch.save({"epoch": 5, "weights": [torch.zeros(1)]}, tmp_path / "c.pt")
    with pytest.raises(
        CheckpointError, match=r"holds no state_dict .*; its keys: 'epoch', 'weights'$"
    ):
        load_checkpoint(tmp_path / "c.pt")
