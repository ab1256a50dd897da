"""Converting with calibration inputs: observer output and rounding gptq, end to end."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from refq_cli.errors import SpecError
from refq_cli.pipeline.artifact import load_artifact
from refq_cli.pipeline.calibration import Call
from refq_cli.pipeline.convert import convert_checkpoint as convert
from refq_cli.pipeline.layer_inputs import layer_hessians
from refq_cli.pipeline.report import to_markdown
from refq_cli.pipeline.verify import verify
from refq_cli.quant.numerics import WeightQParams, dequantize, quantize
from tests.checkpoints import speech_calibration, write

FACTS = "modules:\n  aux: {nonlinearity: relu}\n  context: {batch_first: true}\n"


def spec_file(tmp_path, defaults, extra=""):
    path = tmp_path / "q.yaml"
    body = "".join(f"  {k}: {v}\n" for k, v in defaults.items())
    path.write_text(f"version: 1\n{extra}defaults:\n{body}{FACTS}")
    return path


GPTQ = {
    "dtype": "int4",
    "qscheme": "per_channel_symmetric",
    "observer": "output",
    "rounding": "gptq",
}


def gptq_conversion(tmp_path, out=None):
    """Speech converted by the GPTQ spec on its seeded calibration inputs."""
    out = out or tmp_path / "m.refq.safetensors"
    return convert(
        write(tmp_path, "pt"),
        spec_file(tmp_path, GPTQ),
        out,
        calibration=speech_calibration(tmp_path),
    )


def weight_entries(metadata):
    for path, module in metadata["refq.modules"].items():
        for name, entry in module["weights"].items():
            yield path, name, entry


def test_gptq_artifact_is_an_ordinary_artifact_whose_codes_the_modules_reproduce(tmp_path):
    out = tmp_path / "m.refq.safetensors"
    conversion = gptq_conversion(tmp_path, out)
    tensors = load_file(out)
    artifact = load_artifact(out)
    checked = 0
    for path, name, entry in weight_entries(conversion.metadata):
        assert entry["rounding"] == "gptq" and entry["observer"] == "output"
        codes = tensors[f"{path}.{name}"]
        qp = WeightQParams.create(
            qscheme=entry["qscheme"],
            dtype=entry["dtype"],
            scale=tensors[f"{path}.{name}_scale"],
            zero_point=tensors[f"{path}.{name}_zero_point"],
            axis=entry["axis"],
        )
        assert entry["quant_min"] <= int(codes.min()) and int(codes.max()) <= entry["quant_max"]
        # quantizing the stored weight's values gives its codes back: the identity on it
        assert torch.equal(quantize(dequantize(codes, qp), qp), codes)
        for module in (artifact.modules[path], conversion.modules[path].reference):
            assert torch.equal(module.get_quantized_weight(name).int_repr(), codes)
            assert torch.equal(module.get_weight(name), dequantize(codes, qp))
        checked += 1
    assert checked == 22  # every recurrent weight of Speech
    torch.manual_seed(0)
    for name, converted in conversion.modules.items():
        x = torch.randn(5, 3, 6) if "cell" not in name and name != "gate" else torch.randn(3, 6)
        a, b = artifact.modules[name](x), converted.reference(x)
        a, b = (a[0], b[0]) if isinstance(a, tuple) else (a, b)
        assert torch.equal(a, b)


def test_gptq_beats_nearest_rounding_on_the_calibration_inputs(tmp_path):
    conversion = gptq_conversion(tmp_path)
    for row in conversion.report["modules"]:
        fit, held = row["calibration"]["fit"], row["calibration"]["held_out"]
        assert fit["sequences"] == 14 and held["sequences"] == 2  # every 8th of 16 held out
        assert fit["rows"] == 14 * 12
        for part in (fit, held):
            assert set(part) >= {"nearest_output_sqnr_db", "nearest_hidden_sqnr_db"}
        assert fit["output_sqnr_db"] >= fit["nearest_output_sqnr_db"] - 0.5, row["path"]
    encoder = next(r for r in conversion.report["modules"] if r["path"] == "encoder")
    assert (
        encoder["calibration"]["fit"]["output_sqnr_db"]
        > encoder["calibration"]["fit"]["nearest_output_sqnr_db"]
    )
    json.dumps(conversion.report, allow_nan=False)  # the report file's JSON
    markdown = to_markdown(conversion.report)
    assert "## Calibration inputs" in markdown and "| encoder | held out | 2 |" in markdown
    weights = {(w["module"], w["weight"]): w for w in conversion.report["weights"]}
    assert weights["encoder", "weight_hh_l0"]["rounding"] == "gptq"
    assert "| output + gptq |" in markdown


def test_the_same_inputs_give_the_same_bytes_whatever_the_thread_count(tmp_path):
    checkpoint, calib = write(tmp_path, "pt"), speech_calibration(tmp_path)
    spec = spec_file(tmp_path, GPTQ)
    threads = torch.get_num_threads()
    digests = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out = tmp_path / f"m{n}.refq.safetensors"
            convert(checkpoint, spec, out, calibration=calib)
            digests.append(out.read_bytes())
    finally:
        torch.set_num_threads(threads)
    assert digests[0] == digests[1]


@pytest.mark.parametrize(
    "defaults",
    [
        {"dtype": "qint8", "qscheme": "per_tensor_affine", "observer": "output"},
        {"dtype": "quint8", "qscheme": "per_channel_affine", "rounding": "gptq"},
        {
            "dtype": "uint4",
            "qscheme": "per_tensor_symmetric",
            "observer": "output",
            "rounding": "gptq",
        },
        {"dtype": "qint32", "qscheme": "per_channel_symmetric", "rounding": "gptq"},
    ],
)
@pytest.mark.parametrize("decomposed", [False, True])
def test_every_dtype_and_scheme_round_trips(tmp_path, defaults, decomposed):
    out = tmp_path / "m.refq.safetensors"
    extra = "is_decomposed: true\n" if decomposed else ""
    conversion = convert(
        write(tmp_path, "pt"),
        spec_file(tmp_path, defaults, extra),
        out,
        calibration=speech_calibration(tmp_path),
    )
    artifact = load_artifact(out)
    x = torch.randn(4, 2, 6)
    for name in ("encoder", "aux"):
        assert torch.equal(artifact.modules[name](x)[0], conversion.modules[name].reference(x)[0])


def test_missing_calibration_is_one_line_at_the_setting(tmp_path):
    spec = spec_file(tmp_path, GPTQ)
    with pytest.raises(SpecError) as caught:
        convert(write(tmp_path, "pt"), spec, tmp_path / "m.refq.safetensors")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{spec}:")  # at the line of the setting
    assert "observer output needs calibration inputs" in message
    assert "no calibration file was given" in message and "record_calibration" in message
    assert not (tmp_path / "m.refq.safetensors").exists()


def test_a_calibration_file_without_the_module_is_named(tmp_path):
    calib = tmp_path / "calib.safetensors"
    save_file({"encoder": torch.randn(4, 2, 6)}, calib)
    spec = spec_file(tmp_path, {"dtype": "int4", "rounding": "gptq"})
    with pytest.raises(
        SpecError, match=r"context\.weight_ih_l0: rounding gptq needs .* has no inputs"
    ):
        convert(write(tmp_path, "pt"), spec, tmp_path / "m.refq.safetensors", calibration=calib)


def test_only_the_calibrated_modules_need_inputs(tmp_path):
    calib = tmp_path / "calib.safetensors"
    save_file({"encoder": torch.randn(4, 2, 6)}, calib)
    spec = tmp_path / "q.yaml"
    spec.write_text(
        "version: 1\ndefaults: {dtype: int4}\nrules:\n  - match: encoder\n    rounding: gptq\n"
        + FACTS
    )
    conversion = convert(
        write(tmp_path, "pt"), spec, tmp_path / "m.refq.safetensors", calibration=calib
    )
    rows = {r["path"]: r for r in conversion.report["modules"]}
    assert "calibration" in rows["encoder"] and "calibration" not in rows["aux"]


def test_verify_reads_the_speech_calibration(tmp_path):
    out = tmp_path / "m.refq.safetensors"
    checkpoint, calib = write(tmp_path, "pt"), speech_calibration(tmp_path)
    conversion = convert(checkpoint, spec_file(tmp_path, GPTQ), out, calibration=calib)
    result = verify(out, checkpoint, calibration=calib)
    by_name = {r["path"]: r for r in conversion.report["modules"]}
    for row in result["modules"]:
        assert row["probe"] == "calibration"
        assert row["output_sqnr_db"] == pytest.approx(by_name[row["path"]]["output_sqnr_db"])


# --- the rows each weight multiplies -----------------------------------------------------------


def rows_hessian(rows):
    rows = torch.cat([r.reshape(-1, r.shape[-1]) for r in rows]).double()
    return rows.T @ rows


@pytest.mark.parametrize("kind", [nn.RNN, nn.GRU, nn.LSTM])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_hidden_state_hessians_are_the_states_before_each_step(kind, bidirectional):
    torch.manual_seed(0)
    layer = kind(3, 4, bidirectional=bidirectional).eval()
    x, d = torch.randn(6, 2, 3), 1 + bidirectional
    h_0 = torch.randn(d, 2, 4)
    call = Call(x, h_0, torch.randn(d, 2, 4) if kind is nn.LSTM else None)
    names = [n for n, _ in layer.named_parameters() if n.startswith("weight")]
    with torch.no_grad():
        output = layer(x, (h_0, call.c_0) if kind is nn.LSTM else h_0)[0]
    got = layer_hessians(layer, [call], [output], names)
    assert torch.allclose(got["weight_ih_l0"], rows_hessian([x]))
    assert torch.allclose(got["weight_hh_l0"], rows_hessian([h_0[0], output[:-1, :, :4]]))
    if bidirectional:
        assert torch.equal(got["weight_ih_l0_reverse"], got["weight_ih_l0"])
        expected = rows_hessian([h_0[1], output[1:, :, 4:]])
        assert torch.allclose(got["weight_hh_l0_reverse"], expected)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_projected_lstm_steps_reproduce_its_outputs(bidirectional):
    torch.manual_seed(0)
    layer = nn.LSTM(3, 5, proj_size=2, bidirectional=bidirectional).eval()
    x = torch.randn(7, 2, 3)
    call = Call(x, None, None)
    with torch.no_grad():
        output = layer(x)[0]
    got = layer_hessians(layer, [call], [output], [n for n, _ in layer.named_parameters()])
    # the states stepped here are the module's own: h_{t-1} as its outputs give them
    zeros = torch.zeros(2, 2)
    assert torch.allclose(got["weight_hh_l0"], rows_hessian([zeros, output[:-1, :, :2]]), atol=1e-6)
    if bidirectional:
        expected = rows_hessian([zeros, output[1:, :, 2:]])
        assert torch.allclose(got["weight_hh_l0_reverse"], expected, atol=1e-6)
    assert got["weight_hr_l0"].shape == (5, 5) and bool((got["weight_hr_l0"].diagonal() > 0).all())


def test_cell_hessians_follow_the_unrolled_states():
    torch.manual_seed(0)
    cell = nn.GRUCell(3, 4)
    x, h = torch.randn(5, 2, 3), torch.randn(2, 4)
    states, state, outputs = [], h, []
    with torch.no_grad():
        for step in x:
            states.append(state)
            state = cell(step, state)
            outputs.append(state)
    got = layer_hessians(
        cell, [Call(x, h, None)], [torch.stack(outputs)], ["weight_ih", "weight_hh"]
    )
    assert torch.allclose(got["weight_ih"], rows_hessian([x]))
    assert torch.allclose(got["weight_hh"], rows_hessian(states))


# --- recorded from a model, then converted ----------------------------------------------------


class Seq2Seq(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.LSTM(
            4, 6, num_layers=2, bidirectional=True, proj_size=3, batch_first=True
        )
        self.bridge = nn.GRU(6, 5)
        self.decoder = nn.LSTMCell(4, 5)

    def run(self, batch: int, length: int) -> None:
        with torch.no_grad():
            h_0 = torch.randn(4, batch, 3), torch.randn(4, batch, 6)
            out, _ = self.encoder(torch.randn(batch, length, 4), h_0)
            _, h = self.bridge(out.transpose(0, 1))
            state = (h[0], torch.zeros_like(h[0]))
            for _ in range(3):  # a decoder, one call per step
                state = self.decoder(torch.randn(batch, 4), state)


def test_recorded_calls_convert_with_gptq_and_round_trip(tmp_path):
    from refq_cli.pipeline.record import record_calibration

    torch.manual_seed(0)
    model = Seq2Seq().eval()
    checkpoint = tmp_path / "model.pt"
    torch.save(model.state_dict(), checkpoint)
    calib = tmp_path / "calib.safetensors"
    with record_calibration(model, calib):
        for batch, length in ((3, 5), (2, 9), (4, 4), (1, 7)):
            model.run(batch, length)
    spec = tmp_path / "q.yaml"
    spec.write_text(
        "version: 1\ndefaults: {dtype: int4, observer: output, rounding: gptq}\n"
        "modules:\n  encoder: {batch_first: true}\n"
    )
    out = tmp_path / "m.refq.safetensors"
    conversion = convert(checkpoint, spec, out, calibration=calib)
    rows = {r["path"]: r for r in conversion.report["modules"]}
    assert rows["encoder"]["calibration"]["fit"]["sequences"] == 9  # 10 recorded, 1 held out
    assert rows["decoder"]["calibration"]["fit"]["sequences"] == 27  # 3 steps x 10 rows, less 3
    artifact = load_artifact(out)
    x = torch.randn(2, 6, 4)
    assert torch.equal(
        artifact.modules["encoder"](x)[0], conversion.modules["encoder"].reference(x)[0]
    )
    result = verify(out, checkpoint, calibration=calib)
    assert all(r["probe"] == "calibration" for r in result["modules"])


def test_a_module_recorded_batch_first_but_converted_otherwise_is_refused(tmp_path):
    from refq_cli.errors import RefqError
    from refq_cli.pipeline.record import record_calibration

    model = nn.Module()
    model.encoder = nn.GRU(3, 4, batch_first=True)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    with record_calibration(model, tmp_path / "c.safetensors"), torch.no_grad():
        model.encoder(torch.randn(2, 5, 3))
    spec = tmp_path / "q.yaml"
    spec.write_text("version: 1\ndefaults: {rounding: gptq}\n")
    with pytest.raises(
        RefqError,
        match=r"encoder was recorded with batch_first=True, but is "
        r"converted with batch_first=False; set modules.encoder.batch_first: true",
    ):
        convert(
            tmp_path / "m.pt",
            spec,
            tmp_path / "o.refq.safetensors",
            calibration=tmp_path / "c.safetensors",
        )
    spec.write_text(
        "version: 1\ndefaults: {rounding: gptq}\nmodules: {encoder: {batch_first: true}}\n"
    )
    conversion = convert(
        tmp_path / "m.pt",
        spec,
        tmp_path / "o.refq.safetensors",
        calibration=tmp_path / "c.safetensors",
    )
    assert conversion.report["modules"][0]["probe_shape"] == [2, 5, 3]


def test_inputs_beyond_the_modules_dtype_are_refused(tmp_path):
    from refq_cli.errors import RefqError

    torch.save(nn.GRU(8, 16).half().state_dict(), tmp_path / "m.pt")
    save_file({"<root>": torch.randn(10, 4, 8) * 1e5}, tmp_path / "c.safetensors")  # finite
    with pytest.raises(RefqError, match="holds values beyond float16's range, the module's"):
        convert(
            tmp_path / "m.pt",
            {"version": 1},
            tmp_path / "o.refq.safetensors",
            calibration=tmp_path / "c.safetensors",
        )


@pytest.mark.parametrize(("defaults", "depends"), [(GPTQ, True), ({"dtype": "int4"}, False)])
def test_skip_unchanged_sees_the_calibration_the_codes_depend_on(tmp_path, defaults, depends):
    from refq_cli.pipeline.api import convert as api_convert
    from refq_cli.pipeline.jobs import Job
    from refq_cli.pipeline.uptodate import is_unchanged

    source, spec, calib = (
        write(tmp_path, "pt"),
        spec_file(tmp_path, defaults),
        speech_calibration(tmp_path),
    )
    out = tmp_path / "m.refq.safetensors"
    conversion = api_convert(source, spec, out, calibration=calib)
    assert ("refq.calibration" in conversion.metadata) is depends
    job = Job(source, spec, out, conversion.report_json, calib)
    assert is_unchanged(job)
    speech_calibration(tmp_path, seed=1)  # other inputs, in the same file
    assert is_unchanged(job) is not depends
    assert is_unchanged(Job(source, spec, out, conversion.report_json, None)) is not depends


def test_the_recorded_sha256_is_of_the_bytes_the_codes_were_fitted_on(tmp_path):
    # the file was hashed again after the checkpoint loaded: rewritten in between, the artifact
    # named the new file for codes fitted on the old one, and --skip-unchanged kept it
    from refq_cli.io.digest import sha256_of
    from refq_cli.pipeline.api import convert as api_convert

    source, spec, calib = (
        write(tmp_path, "pt"),
        spec_file(tmp_path, GPTQ),
        speech_calibration(tmp_path),
    )
    fitted_on = sha256_of(calib)

    def rewrite(what, done, total):
        if what == "loading the checkpoint":
            speech_calibration(tmp_path, seed=1)

    conversion = api_convert(
        source, spec, tmp_path / "m.refq.safetensors", calibration=calib, progress=rewrite
    )
    assert sha256_of(calib) != fitted_on  # the file did change during the conversion
    assert conversion.metadata["refq.calibration"]["sha256"] == fitted_on


def test_a_wrappers_recording_converts_with_its_prefix_stripped(tmp_path):
    from refq_cli.pipeline.record import record_calibration

    wrapper = nn.Module()
    wrapper.model = nn.Module()
    wrapper.model.rnn = nn.GRU(3, 4)
    torch.save(wrapper.state_dict(), tmp_path / "m.pt")  # keys model.rnn.*
    with record_calibration(wrapper, tmp_path / "c.safetensors"), torch.no_grad():
        wrapper.model.rnn(torch.randn(5, 2, 3))
    spec = {"version": 1, "strip_prefix": "model.", "defaults": {"rounding": "gptq"}}
    out = tmp_path / "o.refq.safetensors"
    conversion = convert(tmp_path / "m.pt", spec, out, calibration=tmp_path / "c.safetensors")
    assert conversion.report["modules"][0]["probe"] == "calibration"
    assert verify(out, tmp_path / "m.pt", calibration=tmp_path / "c.safetensors")["modules"]
