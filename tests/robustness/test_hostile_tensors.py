"""Small checkpoints with large costs, tensors that hold no plain data, inputs that are not
regular files or change while refq reads them: each refused early with one line and exit 2."""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from refq_cli.errors import ArtifactError, CheckpointError
from refq_cli.io.checkpoint import load_checkpoint, read_tensors
from refq_cli.pipeline.batch import convert_job
from refq_cli.pipeline.convert import convert_checkpoint as convert
from refq_cli.pipeline.jobs import Job, Options
from tests.scripts import run_refq

LSTM = {"lstm.weight_ih": torch.randn(16, 4), "lstm.weight_hh": torch.randn(16, 4)}


def refuses(tmp_path: Path, source: Path, pattern: str, *extra: object) -> None:
    """``refq convert source`` exits 2 with one line matching ``pattern`` and writes nothing."""
    spec = tmp_path / "q.yaml"
    spec.write_text("version: 1\n")
    out = tmp_path / "out" / "x.refq.safetensors"
    out.parent.mkdir(exist_ok=True)
    result = run_refq("convert", source, "-q", spec, "-o", out, *extra)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and re.search(pattern, lines[0]), result.stderr
    assert list(out.parent.iterdir()) == []


def quantized() -> torch.Tensor:
    with warnings.catch_warnings():  # deprecated in torch: all the more reason to refuse it
        warnings.simplefilter("ignore")
        return torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint8)


def saved(tmp_path: Path, name: str, extra: dict) -> Path:
    path = tmp_path / name
    torch.save({**LSTM, **extra}, path)
    return path


@pytest.mark.parametrize(
    ("make", "pattern"),
    [
        (
            lambda: torch.zeros(1).expand(4000, 4000),
            r"'x' is a view whose elements overlap.*stride \(0, 0\)",
        ),
        # 4 TB declared in a file of about 2 kB
        (lambda: torch.zeros(1).expand(1 << 20, 1 << 20), r"'x' is a view whose elements"),
        (
            lambda: torch.zeros(6).as_strided((4, 3), (1, 1)),
            r"'x' is a view whose elements overlap",
        ),
        (lambda: torch.empty(3, device="meta"), r"'x' is on device meta"),
        (lambda: torch.eye(3).to_sparse(), r"'x' has layout sparse_coo"),
        (quantized, r"'x' is already quantized"),
    ],
    ids=["expanded", "expanded-4TB", "overlapping-strides", "meta", "sparse", "quantized"],
)
def test_tensors_without_plain_data_are_refused_in_one_line(tmp_path, make, pattern):
    refuses(tmp_path, saved(tmp_path, "bad.pt", {"x": make()}), pattern)


def test_nested_tensors_are_refused(tmp_path):
    with pytest.warns(UserWarning):  # torch's own: nested tensors are a prototype
        nested = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])
    with pytest.raises(CheckpointError, match="'x' is a nested tensor"):
        load_checkpoint(saved(tmp_path, "nested.pt", {"x": nested}))


def test_views_that_do_not_overlap_are_read(tmp_path):
    base = torch.arange(24.0).reshape(4, 6)
    views = {"t": base.t(), "cols": base[:, 1:4], "step": base[::2, ::3], "empty": base[:0]}
    tensors = read_tensors(saved(tmp_path, "views.pt", views))[2]
    for key, view in views.items():
        assert torch.equal(tensors[key], view), key


def test_keys_that_are_not_strings_are_refused(tmp_path):
    path = saved(tmp_path, "keys.pt", {1: torch.ones(2), "1": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="key 1 is of type int, not a string"):
        load_checkpoint(path)


def test_a_module_named_like_the_root_is_refused(tmp_path):
    cell = {"weight_ih": torch.randn(16, 4), "weight_hh": torch.randn(16, 4)}
    path = tmp_path / "root.pt"
    torch.save({**cell, **{f"<root>.{k}": v for k, v in cell.items()}}, path)
    refuses(tmp_path, path, r"module path '<root>': '<root>' names the root module")


def rezip(source: Path, target: Path, *, pad: int = 0, compress: str | None = None) -> Path:
    """``source`` again with ``pad`` bytes pickled (and popped) at the start of its data.pkl,
    and the entries whose name ends with ``compress`` DEFLATE-compressed."""
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("data.pkl") and pad:  # BINBYTES8 n ... POP
                data = data[:2] + b"\x8e" + pad.to_bytes(8, "little") + bytes(pad) + b"0" + data[2:]
            method = zipfile.ZIP_DEFLATED if compress and info.filename.endswith(compress) else 0
            zout.writestr(info.filename, data, compress_type=method)
    return target


def test_a_compressed_pickle_that_inflates_is_refused_before_inflating(tmp_path):
    plain = saved(tmp_path, "plain.pt", {})
    bomb = rezip(plain, tmp_path / "bomb.pt", pad=64 << 20, compress="data.pkl")
    assert bomb.stat().st_size < 1 << 20
    refuses(tmp_path, bomb, r"zip entry 'plain/data.pkl' is compressed")


def test_compressed_tensor_data_is_refused(tmp_path):
    plain = saved(tmp_path, "plain.pt", {})
    packed = rezip(plain, tmp_path / "packed.pt", compress="data/0")
    with pytest.raises(CheckpointError, match="zip entry 'plain/data/0' is compressed"):
        load_checkpoint(packed)


def test_a_tensor_of_4_terabytes_in_a_small_file_is_refused(tmp_path):
    """A data.pkl whose tensor and storage declare 2**40 float32 elements."""
    path = saved(tmp_path, "big.pt", {"x": torch.empty(7, 11)})

    def long(n: int) -> bytes:  # pickle's LONG1
        return b"\x8a\x06" + n.to_bytes(6, "little")

    with zipfile.ZipFile(path) as archive:
        pickle = archive.read("big/data.pkl")
    edits = [  # element count, shape, strides
        (b"K\x4dt", long(1 << 40) + b"t"),
        (b"K\x07K\x0b\x86", long(1 << 20) + long(1 << 20) + b"\x86"),
        (b"K\x0bK\x01\x86", long(1 << 20) + b"K\x01\x86"),
    ]
    for old, new in edits:
        assert pickle.count(old) == 1, old
        pickle = pickle.replace(old, new)
    crafted = tmp_path / "crafted.pt"
    with zipfile.ZipFile(path) as zin, zipfile.ZipFile(crafted, "w") as zout:
        for info in zin.infolist():
            data = pickle if info.filename.endswith("data.pkl") else zin.read(info.filename)
            zout.writestr(info.filename, data)
    refuses(tmp_path, crafted, "cannot read the checkpoint")


@pytest.mark.parametrize("kind", ["fifo", "device"])
@pytest.mark.parametrize("flag", ["checkpoint", "--calibration"])
def test_files_that_are_not_regular_are_refused_without_reading(tmp_path, kind, flag):
    if kind == "fifo":
        special = tmp_path / "pipe.pt"
        os.mkfifo(special)
    else:
        special = Path("/dev/zero")
    assert not stat.S_ISREG(special.stat().st_mode)
    good = saved(tmp_path, "good.pt", {})
    if flag == "checkpoint":
        refuses(tmp_path, special, r"is not a regular file \(a FIFO, device or socket\)")
    else:
        refuses(tmp_path, good, r"is not a regular file", "--calibration", special)


def test_an_input_rewritten_during_the_conversion_is_refused(tmp_path):
    """The input is memory-mapped after its sha256 is taken: a rewrite in place would give an
    artifact recording the old sha256 over new weights."""
    path = saved(tmp_path, "model.pt", {})
    spec = tmp_path / "q.yaml"
    spec.write_text("version: 1\n")
    out = tmp_path / "x.refq.safetensors"
    new_bytes = path.read_bytes()

    def rewrite(what: str, done: int, total: int | None) -> None:
        if what.startswith("converting"):
            with path.open("r+b") as f:  # same size, same bytes: only its status changes
                f.write(new_bytes)

    with pytest.raises(CheckpointError, match="changed while refq read it"):
        convert(path, spec, out, progress=rewrite)
    assert not out.exists()
    assert convert(path, spec, out).checkpoint.sha256  # unchanged, it converts


def test_a_replaced_input_is_refused(tmp_path):
    path = saved(tmp_path, "model.pt", {})
    spec = tmp_path / "q.yaml"
    spec.write_text("version: 1\n")
    out = tmp_path / "x.refq.safetensors"
    other = saved(tmp_path, "other.pt", {"extra": torch.ones(1)})

    def replace(what: str, done: int, total: int | None) -> None:
        if what.startswith("converting"):
            os.replace(other, path)

    with pytest.raises(CheckpointError, match="changed while refq read it"):
        convert(path, spec, out, progress=replace)
    assert not out.exists()


TRUNCATE = """
import os, sys, torch
from torch import nn
from refq_cli.pipeline.convert import convert_checkpoint as convert
model = nn.Module()
model.a, model.b = nn.LSTM(256, 256), nn.LSTM(256, 256)
torch.save(model.state_dict(), "big.pt")
open("q.yaml", "w").write("version: 1\\n")
def cut(what, done, total):
    if what == "converting b":
        os.truncate("big.pt", 1000)
convert("big.pt", "q.yaml", "out/x.refq.safetensors", progress=cut)
"""


def test_an_input_truncated_while_mapped_ends_the_process_and_leaves_nothing(tmp_path):
    """The documented limit: a mapped file that shrinks raises SIGBUS where refq touches it,
    which no Python code can catch. Nothing half-written is left behind."""
    (tmp_path / "out").mkdir()
    result = subprocess.run(
        [sys.executable, "-c", TRUNCATE], cwd=tmp_path, capture_output=True, check=False
    )
    assert result.returncode == -signal.SIGBUS, result.stderr
    assert list((tmp_path / "out").iterdir()) == []


def test_a_checkpoint_whose_artifact_header_would_be_unreadable_is_refused_before_work(
    tmp_path, monkeypatch
):
    """The case of 150,000 tensors with long names (a header over 100 MB), at a lower limit."""
    monkeypatch.setattr("refq_cli.io.safetensors_writer.MAX_HEADER_BYTES", 20_000)
    path = saved(tmp_path, "many.pt", {f"{i:04d}." + "x" * 100: torch.ones(1) for i in range(200)})
    spec = tmp_path / "q.yaml"
    spec.write_text("version: 1\n")
    steps = []
    with pytest.raises(ArtifactError, match="would be over 20,000 bytes"):
        convert(path, spec, tmp_path / "x.refq.safetensors", progress=lambda *a: steps.append(a))
    assert not any(what.startswith("converting") for what, _, _ in steps)
    assert not (tmp_path / "x.refq.safetensors").exists()


@pytest.mark.parametrize("special", ["fifo", "/dev/zero"])
@pytest.mark.parametrize("command", ["convert", "batch"])
def test_a_spec_or_manifest_that_is_not_a_regular_file_is_refused_unread(
    tmp_path, special, command
):
    if special == "fifo":
        path = tmp_path / "pipe.yaml"
        os.mkfifo(path)
    else:
        path = Path(special)
    good = saved(tmp_path, "good.pt", {})
    args = ["convert", good, "-q", path, "-o", tmp_path / "x.refq.safetensors"]
    result = run_refq(*(args if command == "convert" else ["batch", path]))
    assert result.returncode == 2, result.stderr
    assert re.fullmatch(
        r"refq: error: .*: is not a regular file \(a FIFO, device or socket\)"
        r"; give a (spec|manifest) file\n",
        result.stderr,
    ), result.stderr


def test_a_link_swapped_after_hashing_cannot_show_other_weights(tmp_path, monkeypatch):
    """Every read goes to the file that was hashed, not to what the path names later."""
    import refq_cli.io.checkpoint as checkpoint

    first, second = (tmp_path / "A.pt", tmp_path / "B.pt")
    torch.save({"lstm.weight_ih": torch.ones(16, 4), "lstm.weight_hh": torch.ones(16, 4)}, first)
    torch.save({"lstm.weight_ih": torch.zeros(16, 4), "lstm.weight_hh": torch.ones(16, 4)}, second)
    link = tmp_path / "in.pt"
    link.symlink_to(first)
    hashed = checkpoint.sha256_of

    def hash_then_swap(path):
        digest = hashed(path)
        link.unlink()
        link.symlink_to(second)
        return digest

    monkeypatch.setattr(checkpoint, "sha256_of", hash_then_swap)
    loaded = load_checkpoint(link)
    assert loaded.sha256 == hashed(first)
    assert torch.equal(loaded.tensors["lstm.weight_ih"], torch.ones(16, 4))


P = 2**61 - 1  # Python's hash modulus: integers k * P all hash alike


def flood(pickle: bytes, keys: int) -> bytes:
    """``pickle`` with a dict of ``keys`` colliding integer keys built and popped first."""
    items = b"".join(
        b"\x8a\x0c" + (k * P).to_bytes(12, "little", signed=True) + b"N" for k in range(1, keys + 1)
    )
    return pickle[:2] + b"}(" + items + b"u0" + pickle[2:]


@pytest.mark.parametrize("kind", ["state_dict", "legacy", "torchscript"])
def test_a_hash_collision_flood_is_refused_before_unpickling(tmp_path, kind):
    """64,000 such keys in an 831 kB file took 33 s to unpickle; 1,500 here take no time, and
    are refused all the same."""
    crafted = tmp_path / "flood.pt"
    if kind != "torchscript":
        colliding = {k * P: None for k in range(1, 1501)}
        zip_format = kind == "state_dict"
        checkpoint = {"state_dict": LSTM, "meta": colliding}
        torch.save(checkpoint, crafted, _use_new_zipfile_serialization=zip_format)
    else:  # TorchScript holds 64-bit integers only: a crafted archive
        plain = tmp_path / "plain.pt"
        torch.jit.script(nn.LSTMCell(4, 4)).save(str(plain))
        with zipfile.ZipFile(plain) as zin, zipfile.ZipFile(crafted, "w") as zout:
            for info in zin.infolist():
                data = zin.read(info.filename)
                if info.filename.endswith("/data.pkl"):
                    data = flood(data, 1500)
                zout.writestr(info.filename, data, compress_type=info.compress_type)
    refuses(tmp_path, crafted, r"over 1000 numbers of 2\*\*60 or more, as a hash-collision flood")


def lstm_state(**changes: torch.Tensor) -> dict[str, torch.Tensor]:
    state = dict(nn.LSTM(3, 4, proj_size=2).state_dict())
    state.update(changes)
    return state


@pytest.mark.parametrize(
    ("state", "pattern"),
    [
        (
            {f".{k}": v for k, v in lstm_state().items()},
            r"key '\.weight_ih_l0' has an empty name in its module path",
        ),
        (
            {f"a..{k}": v for k, v in lstm_state().items()},
            r"key 'a\.\.weight_ih_l0' has an empty name",
        ),
        (
            lstm_state(weight_ih_l0=torch.zeros(16, 3, dtype=torch.float8_e4m3fn)),
            r"weight_ih_l0 has dtype float8_e4m3fn; recurrent weights must be float16, bfloat16",
        ),
        (
            lstm_state(weight_ih_l0=torch.zeros(16, 3, dtype=torch.float64)),
            r"the module's weights have different dtypes: float64 \(weight_ih_l0\), float32",
        ),
        (
            lstm_state(weight_hh_l0=torch.zeros(16, 4), weight_hr_l0=torch.zeros(4, 4)),
            r"weight_hr_l0 projects 4 hidden units onto 4; an LSTM's proj_size must be smaller",
        ),
        (
            {f"m\udc80.{k}": v for k, v in lstm_state().items()},
            r"key 'm\\udc80.weight_ih_l0' is not valid Unicode \(a lone surrogate\)",
        ),
    ],
    ids=["empty-module-name", "empty-inner-name", "float8", "mixed-dtypes", "proj", "surrogate"],
)
def test_weights_no_recurrent_module_can_hold_are_refused_in_one_line(tmp_path, state, pattern):
    path = tmp_path / "odd.pt"
    torch.save(state, path)
    refuses(tmp_path, path, pattern)


def test_names_in_the_markdown_report_cannot_start_a_line_or_split_a_cell(tmp_path):
    """A CI step summary shows the report: a module path or file name must not inject a
    workflow command (``::error::``) at the start of a line, or split a table cell."""
    name = "x\n::error title=pwned::owned\x1b[2J"
    state = {f"{name}|cell.{k}": v for k, v in nn.LSTM(3, 4).state_dict().items()}
    path = tmp_path / "odd.pt"
    torch.save(state, path)
    spec = tmp_path / "q.yaml"
    spec.write_text("version: 1\n")
    out = tmp_path / "x.refq.safetensors"
    report = tmp_path / "x.refq.report.json"
    convert_job(Job(path, spec, out, report), Options())
    markdown = report.with_suffix(".md").read_text()
    assert "\x1b" not in markdown
    assert not any(line.startswith("::") for line in markdown.splitlines())
    rows = [line for line in markdown.splitlines() if "pwned" in line and line.startswith("|")]
    assert len(rows) == 3  # two weights and a module, each on its own line
    for row in rows:
        assert row.startswith("| x\\n::error") and row.count(" | ") - row.count("\\| ") in (5, 10)
