"""verify(): an artifact's reference modules rerun against the float checkpoint."""

from __future__ import annotations

import math

import pytest
import torch

from refq_cli.errors import RefqError
from refq_cli.pipeline.convert import convert_checkpoint as convert
from refq_cli.pipeline.verify import verify
from tests.checkpoints import write

SPEC = """\
version: 1
rules:
  - {match: "encoder", qscheme: per_tensor_affine, dtype: quint8}
  - {match: "tanh_cell", dtype: int4}
  - {match: "aux", skip: true}
modules:
  aux: {nonlinearity: relu}
  context: {batch_first: true}
"""
MODULES = {
    "encoder": "LSTM",
    "context": "GRU",
    "decoder.cell": "LSTMCell",
    "gate": "GRUCell",
    "tanh_cell": "RNNCell",
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(artifact, its checkpoint, the conversion report, another checkpoint of the same shapes)."""
    tmp_path = tmp_path_factory.mktemp("verify")
    source = write(tmp_path, "pt")
    spec = tmp_path / "q.yaml"
    spec.write_text(SPEC)
    artifact = tmp_path / "model.refq.safetensors"
    report = convert(source, spec, artifact).report
    (tmp_path / "other").mkdir()
    return artifact, source, report, write(tmp_path / "other", "pt", seed=1)


def test_one_row_per_module_as_the_conversion_measured_it(converted):
    artifact, source, report, _ = converted
    result = verify(artifact, source)
    assert result["artifact"] == str(artifact) and result["checkpoint"] == str(source)
    assert result["source_matches"] is True and result["gate"] is None
    rows = {row["path"]: row for row in result["modules"]}
    assert len(rows) == len(result["modules"]) and set(rows) == set(MODULES)  # not skipped aux
    converted_rows = {m["path"]: m for m in report["modules"]}
    for path, row in rows.items():
        assert row["float_type"] == MODULES[path] and row["probe"] == "random"
        for key in ("probe_shape", "output_sqnr_db", "output_max_abs_error"):
            assert row[key] == converted_rows[path][key], (path, key)
        assert 10 < row["output_sqnr_db"] < 80, path
    assert rows["tanh_cell"]["output_sqnr_db"] < rows["encoder"]["output_sqnr_db"]  # 4 bits
    assert verify(artifact, source) == result  # seeded probes: the same numbers every time


def test_another_checkpoint_does_not_match_the_source(converted):
    artifact, source, _, other = converted
    own = {row["path"]: row["output_sqnr_db"] for row in verify(artifact, source)["modules"]}
    result = verify(artifact, other)
    assert result["source_matches"] is False
    for row in result["modules"]:  # other weights: the artifact's modules are far from them
        assert row["output_sqnr_db"] < own[row["path"]] - 20, row["path"]


def test_gate_record_judges_output_sqnr(converted):
    artifact, source, _, _ = converted
    sqnrs = {row["path"]: row["output_sqnr_db"] for row in verify(artifact, source)["modules"]}
    worst_first = sorted(sqnrs, key=sqnrs.get)
    second = sqnrs[worst_first[1]]
    cases = {
        0.0: [],
        200.0: worst_first,
        second: worst_first[:1],  # a module at the gate passes it
        math.nextafter(second, math.inf): worst_first[:2],
    }
    for min_sqnr, below in cases.items():
        gate = verify(artifact, source, min_sqnr=min_sqnr)["gate"]
        assert gate == {
            "min_sqnr_db": min_sqnr,
            "measure": "output_sqnr",
            "passed": not below,
            "below": [{"name": name, "sqnr_db": sqnrs[name]} for name in below],
        }, min_sqnr


def test_calibration_inputs_replace_the_random_probe(converted, tmp_path):
    artifact, source, _, _ = converted
    calibration = tmp_path / "calib.pt"
    torch.save({"gate": torch.randn(7, 2, 6), "context": torch.randn(2, 9, 6)}, calibration)
    rows = {r["path"]: r for r in verify(artifact, source, calibration=calibration)["modules"]}
    assert (rows["gate"]["probe"], rows["gate"]["probe_shape"]) == ("calibration", [7, 2, 6])
    assert (rows["context"]["probe"], rows["context"]["probe_shape"]) == ("calibration", [2, 9, 6])
    assert rows["encoder"]["probe"] == "random"
    torch.save({"aux": torch.randn(3, 2, 6)}, calibration)  # skipped: not in the artifact
    with pytest.raises(RefqError, match=r"aux is no recurrent module; modules: "):
        verify(artifact, source, calibration=calibration)


def test_a_checkpoint_without_the_artifacts_modules_is_refused(converted, tmp_path):
    artifact, _, _, _ = converted
    state = {k: v for k, v in torch.load(converted[1]).items() if not k.startswith("gate.")}
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(RefqError, match=r"partial\.pt: no recurrent module at gate"):
        verify(artifact, tmp_path / "partial.pt")


def test_a_checkpoint_with_its_module_at_the_root_is_named(tmp_path):
    # "found: none" was printed for a checkpoint whose module is at the root.
    import torch

    from refq_cli.errors import ArtifactError

    torch.manual_seed(0)
    torch.save(
        {"aux." + k: v for k, v in torch.nn.LSTM(4, 3).state_dict().items()}, tmp_path / "a.pt"
    )
    torch.save(torch.nn.LSTM(4, 3).state_dict(), tmp_path / "root.pt")
    (tmp_path / "q.yaml").write_text("version: 1\n")
    convert(tmp_path / "a.pt", tmp_path / "q.yaml", tmp_path / "a.refq.safetensors")
    with pytest.raises(
        ArtifactError, match="no recurrent module at aux, which the artifact holds; found: <root>"
    ):
        verify(tmp_path / "a.refq.safetensors", tmp_path / "root.pt")
