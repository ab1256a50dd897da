"""refq convert, init-config, schema and converters, through CliRunner and the installed script."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file
from typer.testing import CliRunner

from refq_cli.cli.app import app
from refq_cli.spec.spec import load_spec
from tests.checkpoints import FORMATS, silero_file, write
from tests.scripts import run_refq

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
EXAMPLES = CONFIGS.parent / "examples"
PRESETS = sorted(p.name for p in CONFIGS.glob("*.yaml"))
FACTS = "modules:\n  aux: {nonlinearity: relu}\n  context: {batch_first: true}\n"


def spec(tmp_path, body="", facts=FACTS):
    path = tmp_path / "q.yaml"
    path.write_text("version: 1\n" + body + facts)
    return path


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("kind", FORMATS)
def test_every_input_format_through_the_installed_script(tmp_path, kind):
    source = write(tmp_path, kind)
    q = spec(tmp_path, facts="" if kind == "torchscript" else FACTS)
    result = run_refq("convert", source, "-q", q)
    assert result.returncode == 0, result.stderr
    artifact = source.with_name(source.stem + ".refq.safetensors")
    assert artifact.exists()
    assert artifact.with_name(source.stem + ".refq.report.json").exists()
    assert artifact.with_name(source.stem + ".refq.report.md").exists()
    assert "weights quantized" in result.stdout


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_on_a_real_trained_model(tmp_path, preset):
    out = tmp_path / "vad.refq.safetensors"
    source = silero_file("silero_vad_16k.safetensors")
    calibration = []
    if "gptq" in preset:  # calibrated presets need inputs: the LSTMCell's, 128 features
        save_file({"lstm_cell": torch.randn(20, 8, 128)}, tmp_path / "calib.safetensors")
        calibration = ["--calibration", tmp_path / "calib.safetensors"]
    result = invoke("convert", source, "-q", CONFIGS / preset, "-o", out, "--json", *calibration)
    assert result.exit_code == 0, result.output
    (record,) = json.loads(result.stdout)["jobs"]
    assert record["output"] == str(out) and record["status"] == "converted"
    report = json.loads(Path(record["report_json"]).read_text())
    assert report["totals"]["weights_quantized"] == 2


@pytest.mark.parametrize("observer", ["minmax", "mse", "percentile", "fixed"])
def test_every_observer(tmp_path, observer):
    body = f"defaults: {{observer: {observer}}}\n"
    if observer == "fixed":
        body = "defaults: {observer: fixed, qscheme: per_tensor_symmetric, scale: 0.01}\n"
    result = invoke("convert", write(tmp_path, "pt"), "-q", spec(tmp_path, body), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(Path(json.loads(result.stdout)["jobs"][0]["report_json"]).read_text())
    assert {w["observer"] for w in report["weights"]} == {observer}


def test_the_torchscript_real_case(tmp_path):
    out = tmp_path / "vad.refq.safetensors"
    result = invoke(
        "convert",
        silero_file("silero_vad.jit"),
        "-q",
        CONFIGS / "int8-per-channel-symmetric.yaml",
        "-o",
        out,
        "--quiet",
    )
    assert result.exit_code == 0, result.output
    assert result.output == ""
    report = json.loads(out.with_name("vad.refq.report.json").read_text())
    assert {m["path"] for m in report["modules"]} == {"_model.decoder.rnn", "_model_8k.decoder.rnn"}


SPEC_ERRORS = {
    "unknown-key": ("defualts: {}\n", "q.yaml:2:1: unknown key 'defualts'"),
    "bad-value": ("defaults: {dtype: int3}\n", "q.yaml:2:19: dtype must be one of"),
    "rule-matches-nothing": ("rules:\n  - match: nothing\n", "q.yaml:3:12: rule match"),
    "fixed-wrong-length": (
        "rules:\n  - match: gate\n    observer: fixed\n    scale: [0.1, 0.2]\n",
        "q.yaml:5:12: gate.weight_ih: per-channel scale has 2 entries",
    ),
    "zero-point-out-of-range": (
        "defaults: {observer: fixed, qscheme: per_tensor_affine, dtype: quint8, scale: 0.1, "
        "zero_point: 300}\n",
        "q.yaml:2:96: .*zero_point must lie in \\[0, 255\\]",
    ),
    "quant-range": (
        "defaults: {quant_min: 10, quant_max: 5}\n",
        "q.yaml:2:23: .*quant_min < quant_max",
    ),
    "python-tag": (
        "defaults: !!python/object/apply:os.system ['true']\n",
        "q.yaml:2:11: defaults must be a mapping",
    ),
}


@pytest.mark.parametrize(("body", "message"), SPEC_ERRORS.values(), ids=SPEC_ERRORS.keys())
def test_spec_errors_exit_2_with_one_line(tmp_path, body, message):
    source = write(tmp_path, "pt")
    result = run_refq("convert", source, "-q", spec(tmp_path, body))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert lines[0].startswith("refq: error: ")
    assert re.search(message, lines[0].replace(str(tmp_path) + "/", "")), lines[0]
    assert not source.with_name("model.refq.safetensors").exists()


def test_outputs_are_never_overwritten_without_force(tmp_path):
    source, q = write(tmp_path, "pt"), spec(tmp_path)
    assert invoke("convert", source, "-q", q).exit_code == 0
    artifact = source.with_name("model.refq.safetensors")
    before = artifact.read_bytes()
    result = invoke("convert", source, "-q", q)
    assert result.exit_code == 2 and "already exists; pass --force" in result.output
    assert invoke("convert", source, "-q", q, "--force").exit_code == 0
    assert artifact.read_bytes() == before
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_the_output_may_not_be_the_input(tmp_path):
    source, q = write(tmp_path, "pt"), spec(tmp_path)
    original = source.read_bytes()
    result = invoke("convert", source, "-q", q, "-o", source, "--force")
    assert result.exit_code == 2 and "would overwrite the input" in result.output
    assert source.read_bytes() == original
    link = tmp_path / "link.safetensors"
    link.symlink_to(source)
    result = invoke("convert", source, "-q", q, "-o", link, "--force")
    assert result.exit_code == 2 and "would overwrite the input" in result.output


def test_quality_gate_exits_1_after_writing_the_report(tmp_path):
    source, q = write(tmp_path, "pt"), spec(tmp_path)
    result = run_refq("convert", source, "-q", q, "--min-sqnr", "200")
    assert result.returncode == 1
    assert "quality gate" in result.stderr and "below 200 dB" in result.stderr
    assert source.with_name("model.refq.rejected.report.md").exists()  # set aside
    assert not source.with_name("model.refq.report.md").exists()
    assert invoke("convert", source, "-q", q, "--min-sqnr", "10", "--force").exit_code == 0


def test_report_path_option(tmp_path):
    report = tmp_path / "reports" / "r.json"
    report.parent.mkdir()
    result = invoke("convert", write(tmp_path, "pt"), "-q", spec(tmp_path), "--report", report)
    assert result.exit_code == 0, result.output
    assert json.loads(report.read_text())["totals"]["weights_quantized"] == 22
    assert report.with_suffix(".md").read_text().startswith("# refq conversion report")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_cuda_when_absent(tmp_path):
    result = invoke("convert", write(tmp_path, "pt"), "-q", spec(tmp_path), "--device", "cuda")
    assert result.exit_code == 2
    assert "--device cuda: CUDA is not available on this machine" in result.output


@pytest.mark.parametrize("flag", ["--trust-code", "--trust-pickle"])
def test_pickled_module_is_refused_with_the_flag_to_use(tmp_path, flag):
    source = write(tmp_path, "pickle")
    result = invoke("convert", source, "-q", spec(tmp_path))
    assert result.exit_code == 2 and "--trust-code" in result.output
    assert invoke("convert", source, "-q", spec(tmp_path), flag, "--force").exit_code == 0


def test_debug_shows_the_traceback(tmp_path):
    result = run_refq(
        "convert", tmp_path / "missing.pt", "-q", spec(tmp_path), env={"REFQ_DEBUG": "1"}
    )
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_init_config_writes_a_spec_that_converts(tmp_path):
    source = write(tmp_path, "pt")
    skeleton = tmp_path / "skeleton.yaml"
    result = invoke("init-config", source, "-o", skeleton)
    assert result.exit_code == 0, result.output
    text = skeleton.read_text()
    for path in ("encoder", "context", "aux", "decoder.cell", "gate", "tanh_cell"):
        assert f'- match: "{path}"' in text
    assert "weight_hr_l1_reverse 3x8" in text and 'nonlinearity: "tanh"' in text
    load_spec(skeleton)
    result = invoke("convert", source, "-q", skeleton)
    assert result.exit_code == 0, result.output


def test_schema_command_prints_the_schema():
    result = invoke("schema")
    assert result.exit_code == 0
    schema = json.loads(result.stdout)
    assert schema["title"] == "refq spec" and "rules" in schema["properties"]


def test_converters_command_lists_the_builtins():
    result = invoke("converters")
    assert result.exit_code == 0
    assert "torch.nn.modules.rnn.LSTM -> refq_cli.reference.sequence.LSTM.from_float" in (
        result.stdout
    )
    assert len(result.stdout.strip().splitlines()) == 6


def test_generated_spec_round_trips_through_yaml(tmp_path):
    spec_path = spec(
        tmp_path, "rules:\n  - {match: gate, dtype: quint8, qscheme: per_tensor_affine}\n"
    )
    loaded = load_spec(spec_path)
    again = tmp_path / "again.yaml"
    again.write_text(yaml.safe_dump(loaded.to_dict()))
    assert load_spec(again).to_dict() == loaded.to_dict()


def test_init_config_for_a_root_module_and_glob_characters(tmp_path):
    import torch

    root = tmp_path / "root.pt"
    torch.save(torch.nn.GRU(3, 4).state_dict(), root)
    skeleton = tmp_path / "root.yaml"
    assert invoke("init-config", root, "-o", skeleton).exit_code == 0
    assert '- match: "<root>"' in skeleton.read_text()
    assert invoke("convert", root, "-q", skeleton).exit_code == 0

    odd = tmp_path / "odd.pt"
    torch.save({f"enc[0].{k}": v for k, v in torch.nn.GRUCell(3, 4).state_dict().items()}, odd)
    skeleton = tmp_path / "odd.yaml"
    assert invoke("init-config", odd, "-o", skeleton).exit_code == 0
    result = invoke("convert", odd, "-q", skeleton)
    assert result.exit_code == 0, result.output


OUTPUT_CLASHES = {
    "report-is-artifact": (
        ["-o", "a.safetensors", "--report", "a.safetensors"],
        "--report .*a.safetensors: the same file as --output",
    ),
    "markdown-report": (["--report", "r.md"], "--report r.md: give the JSON path"),
    "folder-is-a-file": (["--report", "q.yaml/r.json"], "the folder q.yaml is not a directory"),
    "report-is-input": (["--report", "model.pt"], "would overwrite the input"),
    "output-is-spec": (["-o", "q.yaml"], "--output q.yaml: would overwrite the spec"),
}


@pytest.mark.parametrize(("args", "message"), OUTPUT_CLASHES.values(), ids=OUTPUT_CLASHES.keys())
def test_output_paths_are_checked_before_any_work(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "pt")
    spec(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    result = invoke("convert", "model.pt", "-q", "q.yaml", *args, "--force")
    assert result.exit_code == 2 and re.search(message, result.output), result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_missing_output_folders_are_made_for_every_flag(tmp_path, monkeypatch):
    # -o into a missing folder was refused while --out-dir made one; now each makes it, and
    # only once the work is done: a run refused before its work leaves no folder.
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "pt")
    spec(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\ndefaults: {dtype: int3}\n")
    refused = invoke("convert", "model.pt", "-q", bad, "-o", "new/a.st", "--report", "r/a.json")
    assert refused.exit_code == 2 and "bad.yaml:2:19" in refused.output
    assert not Path("new").exists() and not Path("r").exists()
    args = ["-o", "new/deeper/a.st", "--report", "reports/a.json"]
    result = invoke("convert", "model.pt", "-q", "q.yaml", *args, "--quiet")
    assert result.exit_code == 0, result.output
    assert Path("new/deeper/a.st").is_file() and Path("reports/a.md").is_file()
    result = invoke(
        "convert", "model.pt", "-q", "q.yaml", "-o", "b.st", "--summary-md", "ci/s/summary.md"
    )
    assert result.exit_code == 0, result.output
    assert Path("ci/s/summary.md").read_text().startswith("## refq batch conversion")


def test_calibration_keys_must_name_modules(tmp_path):
    import torch

    calibration = tmp_path / "calib.pt"
    torch.save({"gaet": torch.randn(4, 2, 6)}, calibration)
    result = invoke(
        "convert", write(tmp_path, "pt"), "-q", spec(tmp_path), "--calibration", calibration
    )
    assert result.exit_code == 2 and "gaet is no recurrent module" in result.output
    torch.save({"gate": torch.randn(0, 2, 6)}, calibration)
    result = invoke(
        "convert", write(tmp_path, "pt"), "-q", spec(tmp_path), "--calibration", calibration
    )
    assert result.exit_code == 2 and "non-empty 3-D (time, batch, features)" in result.output


def test_min_sqnr_must_be_finite(tmp_path):
    result = invoke("convert", write(tmp_path, "pt"), "-q", spec(tmp_path), "--min-sqnr", "nan")
    assert result.exit_code == 2 and "--min-sqnr nan" in result.output


def test_help_shows_the_defaults_and_the_argument_name():
    result = CliRunner().invoke(app, ["convert", "--help"], env={"COLUMNS": "200"})
    assert "[default: CHECKPOINT stem + .refq.safetensors]" in result.output
    assert "Usage: refq convert [OPTIONS] {CHECKPOINT}..." in result.output


def test_assumed_facts_get_one_warning_line_naming_the_spec_keys(tmp_path):
    source = write(tmp_path, "pt")
    result = run_refq(
        "convert", source, "-q", spec(tmp_path), "-o", tmp_path / "x.refq.safetensors"
    )
    assert result.returncode == 0, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("refq: warning: model.pt: weights cannot tell these facts")
    assert 'modules.tanh_cell.nonlinearity: "tanh"' in line and "modules.encoder.dropout" in line
    quiet = run_refq(
        "convert", source, "-q", spec(tmp_path), "-o", tmp_path / "y.refq.safetensors", "--quiet"
    )
    assert quiet.returncode == 0 and quiet.stderr == ""
    bundled = run_refq(
        "convert",
        EXAMPLES / "models" / "example.pt",
        "-q",
        EXAMPLES / "models" / "example.yaml",
        "-o",
        tmp_path / "example.refq.safetensors",
    )
    assert bundled.returncode == 0 and bundled.stderr == ""  # its spec sets every fact


def test_strip_prefix_converts_a_lightning_checkpoint_for_the_bare_models_spec(tmp_path):
    import torch

    from tests.checkpoints import speech_state

    ckpt = tmp_path / "last.ckpt"
    state = {"model." + k: v for k, v in speech_state().items()}
    torch.save({"state_dict": state, "epoch": 7, "optimizer_states": []}, ckpt)
    q = spec(tmp_path)
    refused = invoke("convert", str(ckpt), "-q", str(q))
    assert refused.exit_code == 2
    assert "under 'model.': add strip_prefix: model. to the spec or pass --strip-prefix model." in (
        refused.stderr
    )
    out = str(tmp_path / "out")
    args = ("convert", str(ckpt), "-q", str(q), "--strip-prefix", "model.", "--out-dir", out)
    done = invoke(*args, "--json")
    assert done.exit_code == 0, done.stderr
    assert json.loads(done.stdout)["jobs"][0]["status"] == "converted"
    again = invoke(*args, "--skip-unchanged", "--json")  # the flag is part of what it compares
    assert json.loads(again.stdout)["jobs"][0]["status"] == "skipped"
    other = invoke(*args[:-4], "--strip-prefix", "model", "--out-dir", out, "--skip-unchanged")
    assert other.exit_code == 0, other.stderr
    assert "SKIPPED" in other.stdout  # model and model. are one prefix


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["-o", "."], "--output .: names a folder, not a file; give a file path (a folder for"),
        (["-o", ""], "--output : names a folder, not a file; give a file path"),
        (["-o", "new/"], "--output new/: names a folder"),
        (["--report", "."], "--report .: names a folder"),
        (["-o", "a.st", "--out-dir", "o"], "--output names the artifact itself"),
        (["--device", "tpu"], "--device tpu: use cpu or cuda"),
        (["--strip-prefix", ""], "--strip-prefix : give the prefix"),
        (["--strip-prefix", "..", "--out-dir", "o"], "--strip-prefix ..: give the prefix"),
    ],
)
def test_bad_typed_outputs_devices_and_prefixes_stop_before_any_work(
    tmp_path, monkeypatch, extra, message
):
    monkeypatch.chdir(tmp_path)
    source = write(tmp_path, "pt")
    result = invoke("convert", source, "-q", spec(tmp_path), *extra)
    assert result.exit_code == 2, result.stdout
    assert result.stderr.startswith("refq: error: ") and message in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "q.yaml"]


def test_a_spec_prefix_of_dots_is_refused_at_its_place(tmp_path):
    source = write(tmp_path, "pt")
    result = invoke("convert", source, "-q", spec(tmp_path, "strip_prefix: .\n"))
    assert result.exit_code == 2
    assert re.search(r"q\.yaml:2:15: strip_prefix '\.': give a prefix", result.stderr)


def test_batch_takes_strip_prefix_and_checks_it_against_each_spec_first(tmp_path):
    import torch

    from tests.checkpoints import speech_state

    state = {"model." + k: v for k, v in speech_state().items()}
    torch.save({"state_dict": state}, tmp_path / "a.ckpt")
    spec(tmp_path)
    manifest = tmp_path / "m.yaml"
    manifest.write_text("version: 1\njobs:\n  - {input: a.ckpt, spec: q.yaml, out_dir: out}\n")
    ok = invoke("batch", manifest, "--strip-prefix", "model.")
    assert ok.exit_code == 0, ok.stderr
    (tmp_path / "p.yaml").write_text((tmp_path / "q.yaml").read_text() + "strip_prefix: module.\n")
    manifest.write_text("version: 1\njobs:\n  - {input: a.ckpt, spec: p.yaml, out_dir: out2}\n")
    clash = invoke("batch", manifest, "--strip-prefix", "model.")
    assert (
        clash.exit_code == 2 and "the spec" in clash.stderr and "give one of them" in clash.stderr
    )
    assert not (tmp_path / "out2").exists()
