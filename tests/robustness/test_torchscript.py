"""Reading TorchScript archives without running their code (refq_cli.io.torchscript).

The reader must give what ``torch.jit.load(path).state_dict()`` gives, run nothing from the
archive, and turn anything malformed or hostile into one CheckpointError line.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from refq_cli.errors import CheckpointError
from refq_cli.io.checkpoint import load_checkpoint
from refq_cli.io.torchscript import TorchScriptContents, is_torchscript, read_torchscript
from tests.checkpoints import silero_file
from tests.scripts import run_refq

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
BUDGET = int(os.environ.get("REFQ_FUZZ_EXAMPLES", "400"))
FUZZ = settings(
    max_examples=BUDGET,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


# --- models ---------------------------------------------------------------------------------


class Tree(nn.Module):
    """Submodules, parameters and buffers registered interleaved, tied and shared storages,
    several dtypes, a non-persistent buffer and a plain tensor attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("first", torch.arange(3.0))
        self.encoder = nn.Sequential(nn.Conv1d(2, 3, 1), nn.BatchNorm1d(3), nn.ReLU())
        self.scale = nn.Parameter(torch.ones(3))
        self.heads = nn.ModuleList([nn.Linear(3, 2, bias=False), nn.Linear(2, 2)])
        self.heads[1].weight = nn.Parameter(torch.randn(2, 2))
        self.tied = nn.Linear(2, 2)
        self.tied.weight = self.heads[1].weight
        self.register_buffer("scratch", torch.zeros(2), persistent=False)
        self.plain = torch.full((2,), 5.0)
        base = torch.arange(12.0)
        self.register_buffer("rows", base[2:6])
        self.register_buffer("evens", base[::2])
        self.register_buffer("grid", base.view(3, 4).t())
        self.f16 = nn.Linear(2, 2).half()
        self.bf16 = nn.Linear(2, 2).to(torch.bfloat16)
        self.f64 = nn.GRUCell(2, 3).double()
        self.register_buffer("count", torch.tensor(7))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x) * self.scale[None, :, None] + self.plain.sum()


class Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.outer = nn.Module()
        self.outer.inner = nn.Module()
        self.outer.inner.rnn = nn.LSTMCell(3, 4)
        self.outer.norm = nn.LayerNorm(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.outer.norm(self.outer.inner.rnn(x)[0])


def _scripted(module: nn.Module) -> nn.Module:
    return torch.jit.script(module)


RECURRENT = {
    "lstm": lambda: nn.LSTM(
        3, 4, num_layers=2, bidirectional=True, proj_size=2, batch_first=True, dropout=0.25
    ),
    "gru": lambda: nn.GRU(3, 5, bias=False),
    "rnn": lambda: nn.RNN(3, 4, nonlinearity="relu"),
    "rnn-tanh": lambda: nn.RNN(3, 4, num_layers=3),
    "lstm-cell": lambda: nn.LSTMCell(3, 4),
    "gru-cell": lambda: nn.GRUCell(3, 4, bias=False),
    "rnn-cell": lambda: nn.RNNCell(3, 4, nonlinearity="relu"),
}
TRACED = {
    "traced-lstm": (lambda: nn.LSTM(3, 4, num_layers=2), torch.zeros(2, 1, 3)),
    "traced-gru-cell": (lambda: nn.GRUCell(3, 4), torch.zeros(1, 3)),
    "traced-nested": (Nested, torch.zeros(1, 3)),
}
OTHERS = {"tree": Tree, "nested": Nested}


def save(tmp_path: Path, kind: str) -> tuple[Path, nn.Module]:
    """Write the model ``kind`` as a TorchScript archive; return its path and the float model."""
    torch.manual_seed(0)
    path = tmp_path / f"{kind}.pt"
    if kind in TRACED:
        make, example = TRACED[kind]
        model = make()
        torch.jit.trace(model, example).save(str(path))
    else:
        model = (RECURRENT | OTHERS)[kind]()
        _scripted(model).save(str(path))
    return path, model


def assert_like_torch(path: Path, contents: TorchScriptContents) -> None:
    expected = torch.jit.load(str(path), map_location="cpu").state_dict()
    assert list(contents.tensors) == list(expected)
    for name, want in expected.items():
        got = contents.tensors[name]
        assert got.dtype == want.dtype, name
        assert got.shape == want.shape, name
        assert got.stride() == want.stride(), name
        assert got.storage_offset() == want.storage_offset(), name
        assert torch.equal(got, want), name


@pytest.mark.parametrize("kind", [*RECURRENT, *TRACED, *OTHERS])
def test_reads_what_torch_jit_load_gives(tmp_path, kind):
    path, _ = save(tmp_path, kind)
    assert is_torchscript(path)
    assert_like_torch(path, read_torchscript(path))


def test_shared_storages_stay_shared(tmp_path):
    path, _ = save(tmp_path, "tree")
    tensors = read_torchscript(path).tensors
    storage = tensors["rows"].untyped_storage().data_ptr()
    assert tensors["evens"].untyped_storage().data_ptr() == storage
    assert tensors["grid"].untyped_storage().data_ptr() == storage
    assert tensors["tied.weight"].data_ptr() == tensors["heads.1.weight"].data_ptr()
    assert {tensors[k].dtype for k in ("f16.weight", "bf16.weight", "f64.weight_ih")} == {
        torch.float16,
        torch.bfloat16,
        torch.float64,
    }


def test_silero_vad_archive():
    path = silero_file("silero_vad.jit")
    contents = read_torchscript(path)
    assert_like_torch(path, contents)
    assert contents.facts["_model.decoder.rnn"] == {
        "input_size": 128,
        "hidden_size": 128,
        "bias": True,
    }


SEQUENCE = ["input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout"]
CELL = ["input_size", "hidden_size", "bias"]
FACTS = {
    "RNN": [*SEQUENCE, "bidirectional", "nonlinearity"],
    "GRU": [*SEQUENCE, "bidirectional"],
    "LSTM": [*SEQUENCE, "bidirectional", "proj_size"],
    "RNNCell": [*CELL, "nonlinearity"],
    "GRUCell": CELL,
    "LSTMCell": CELL,
}


@pytest.mark.parametrize("kind", list(RECURRENT))
def test_facts_of_scripted_recurrent_modules(tmp_path, kind):
    path, model = save(tmp_path, kind)
    names = FACTS[type(model).__name__]
    expected = {k: getattr(model, k) for k in names}
    expected["bias"] = model.bias if isinstance(model.bias, bool) else model.bias is not None
    facts = read_torchscript(path).facts
    assert facts == {"": expected}
    assert all(type(v) is type(expected[k]) for k, v in facts[""].items())


def test_facts_of_nested_and_traced_modules(tmp_path):
    path, _ = save(tmp_path, "nested")
    assert read_torchscript(path).facts == {
        "outer.inner.rnn": {"input_size": 3, "hidden_size": 4, "bias": True}
    }
    path, _ = save(tmp_path, "tree")  # the GRUCell; no other module looks recurrent
    assert read_torchscript(path).facts == {
        "f64": {"input_size": 2, "hidden_size": 3, "bias": True}
    }
    for kind in TRACED:  # tracing records no constructor arguments: no facts to claim
        path, _ = save(tmp_path, kind)
        assert read_torchscript(path).facts == {}


# --- the hostile archive -------------------------------------------------------------------


class Hostile(nn.Module):
    """Its __setstate__, run by torch.jit.load, writes a file, maps another read-write and
    changes it, and prints."""

    def __init__(self, folder: str) -> None:
        super().__init__()
        self.folder = folder
        self.probe = torch.zeros(1)

    @torch.jit.export
    def __getstate__(self) -> tuple[str, bool]:
        return (self.folder, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, bool]) -> None:
        self.folder = state[0]
        self.training = state[1]
        torch.save(torch.ones(1), self.folder + "/written.pt")
        victim = torch.from_file(
            self.folder + "/victim.bin", shared=True, size=8, dtype=torch.uint8
        )
        victim.fill_(7)
        self.probe = victim
        print("HOSTILE CODE RAN")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class Carrier(nn.Module):
    def __init__(self, folder: str) -> None:
        super().__init__()
        self.hostile = Hostile(folder)
        self.decoder = nn.Module()
        self.decoder.rnn = nn.LSTMCell(5, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder.rnn(self.hostile(x))[0]


VICTIM = bytes(range(8))


@pytest.fixture
def hostile(tmp_path) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """(archive, the folder its code writes into, the tensors it holds)."""
    folder = tmp_path / "sandbox"
    folder.mkdir()
    (folder / "victim.bin").write_bytes(VICTIM)
    torch.manual_seed(0)
    scripted = torch.jit.script(Carrier(str(folder)))
    path = tmp_path / "hostile.pt"
    scripted.save(str(path))
    return path, folder, dict(scripted.state_dict())


def assert_untouched(folder: Path) -> None:
    assert sorted(p.name for p in folder.iterdir()) == ["victim.bin"]
    assert (folder / "victim.bin").read_bytes() == VICTIM


def test_hostile_fixture_runs_its_code_under_torch_jit_load(hostile):
    path, folder, _ = hostile
    code = f"import torch; torch.jit.load({str(path)!r})"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "HOSTILE CODE RAN" in result.stdout
    assert (folder / "written.pt").exists()
    assert (folder / "victim.bin").read_bytes() == b"\x07" * 8


def test_hostile_archive_is_read_without_running_it(hostile, capfd):
    path, folder, expected = hostile
    contents = read_torchscript(path)
    assert capfd.readouterr() == ("", "")
    assert_untouched(folder)
    assert list(contents.tensors) == list(expected)
    assert all(torch.equal(contents.tensors[k], v) for k, v in expected.items())
    assert contents.facts == {"decoder.rnn": {"input_size": 5, "hidden_size": 6, "bias": True}}
    assert load_checkpoint(path).format == "torchscript"
    assert capfd.readouterr() == ("", "")
    assert_untouched(folder)


def test_hostile_archive_through_the_refq_script(hostile, tmp_path):
    path, folder, _ = hostile
    outputs = tmp_path / "tmp"
    outputs.mkdir()
    result = run_refq("init-config", path)
    assert result.returncode == 0, result.stderr
    assert "decoder.rnn" in result.stdout
    qconfig = CONFIGS / "int8-per-channel-symmetric.yaml"
    output = outputs / "x.refq.safetensors"
    converted = run_refq("convert", path, "--qconfig", qconfig, "--output", output)
    assert converted.returncode == 0, converted.stderr
    assert output.exists()
    verified = run_refq("verify", output, "--against", path, "--calibration", path)
    # the archive holds weights, not probe inputs: refused as a calibration file, once read
    assert verified.returncode == 2, verified.stderr
    assert "is no recurrent module" in verified.stderr
    calibrated = run_refq(
        "convert", path, "-q", qconfig, "-o", outputs / "y.refq.safetensors", "--calibration", path
    )
    assert calibrated.returncode == 2, calibrated.stderr
    assert "is no recurrent module" in calibrated.stderr
    for run in (result, converted, verified, calibrated):
        assert "HOSTILE" not in run.stdout + run.stderr
    assert_untouched(folder)


# --- archives made by hand -----------------------------------------------------------------

CODE = 'class M(Module):\n  __parameters__ = ["w", ]\n  __buffers__ = []\n  w : Tensor\n'


def s(text: str) -> bytes:
    """A pickled str (BINUNICODE)."""
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def tensor(key: str = "0", numel: int = 4, offset: int = 0, size=(4,), stride=(1,)) -> bytes:
    """Pickle opcodes rebuilding a float tensor the way TorchScript writes one."""

    def ints(values) -> bytes:
        return b"(" + b"".join(b"J" + struct.pack("<i", v) for v in values) + b"t"

    return (
        b"ctorch._utils\n_rebuild_tensor_v2\n(("
        + s("storage")
        + b"ctorch\nFloatStorage\n"
        + s(key)
        + s("cpu")
        + b"J"
        + struct.pack("<i", numel)
        + b"tQJ"
        + struct.pack("<i", offset)
        + ints(size)
        + ints(stride)
        + b"\x89ccollections\nOrderedDict\n)Rt"
        + b"R"
    )


def module(state: bytes, cls: str = "M") -> bytes:
    """A module object: NEWOBJ of its class, then its state dict, then BUILD."""
    return b"c__torch__\n" + cls.encode() + b"\n)\x81}(" + state + b"ub"


VALID = b"\x80\x02" + module(s("w") + tensor()) + b"."
WEIGHTS = struct.pack("<4f", 1.0, 2.0, 3.0, 4.0)


def archive(
    tmp_path: Path,
    pickle_bytes: bytes = VALID,
    *,
    code: str | bytes = CODE,
    storages: dict[str, bytes] | None = None,
    deflate: tuple[str, ...] = (),
    name: str = "made.pt",
) -> Path:
    """A TorchScript-shaped zip: a/data.pkl, a/code/__torch__.py, a/data/<key>."""
    path = tmp_path / name
    entries = {"a/data.pkl": pickle_bytes, "a/code/__torch__.py": code, "a/version": b"3\n"}
    for key, data in (storages if storages is not None else {"0": WEIGHTS}).items():
        entries[f"a/data/{key}"] = data
    with zipfile.ZipFile(path, "w") as z:
        for entry, data in entries.items():
            method = zipfile.ZIP_DEFLATED if entry in deflate else zipfile.ZIP_STORED
            z.writestr(entry, data, compress_type=method)
    return path


def refused(path: Path, *words: str) -> str:
    with pytest.raises(CheckpointError) as info:
        read_torchscript(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(path)), message
    for word in words:
        assert word in message, message
    return message


def test_hand_made_archive_reads(tmp_path):
    tensors = read_torchscript(archive(tmp_path)).tensors
    assert list(tensors) == ["w"]
    assert tensors["w"].tolist() == [1.0, 2.0, 3.0, 4.0]


def test_truncated_archives(tmp_path):
    path, _ = save(tmp_path, "lstm-cell")
    data = path.read_bytes()
    for cut in (0, 10, 30, len(data) // 3, len(data) // 2, len(data) - 30, len(data) - 1):
        cut_path = tmp_path / f"cut{cut}.pt"
        cut_path.write_bytes(data[:cut])
        refused(cut_path)


@pytest.mark.parametrize(
    "global_name",
    [
        "os\nsystem",
        "builtins\neval",
        "torch\nload",
        "posix\nsystem",
        "copyreg\n_reconstructor",
        "torch._utils\n_rebuild_qtensor",
        "torch\nfrom_file",
        "torch.serialization\nload",
    ],
)
def test_forbidden_globals_are_refused(tmp_path, global_name):
    evil = b"\x80\x02c" + global_name.encode() + b"\n" + s("echo hi") + b"\x85R."
    refused(archive(tmp_path, evil), "refuses", global_name.split("\n")[1])


def test_a_forbidden_global_inside_the_module_state(tmp_path):
    evil = b"\x80\x02" + module(s("w") + b"cbuiltins\nexec\n" + s("print(1)") + b"\x85R") + b"."
    refused(archive(tmp_path, evil), "builtins.exec")


def test_missing_storage(tmp_path):
    refused(archive(tmp_path, storages={}), "no entry", "a/data/0")
    refused(archive(tmp_path, b"\x80\x02" + module(s("w") + tensor(key="7")) + b"."), "a/data/7")


@pytest.mark.parametrize(
    "layout",
    [
        {"size": (5,)},
        {"offset": 1},
        {"size": (2, 2), "stride": (3, 1)},
        {"size": (-1,)},
        {"stride": (-1,)},
        {"offset": -4, "size": (2,)},
        {"size": (2**31 - 1,)},
        {"size": (2, 2), "stride": (2**31 - 1, 1)},
        {"size": (1, 1), "stride": (1,)},
    ],
)
def test_tensor_that_does_not_fit_its_storage(tmp_path, layout):
    refused(archive(tmp_path, b"\x80\x02" + module(s("w") + tensor(**layout)) + b"."))


@pytest.mark.parametrize("numel", [5, 2**31 - 1, -1])
def test_storage_larger_than_its_entry_or_negative(tmp_path, numel):
    refused(archive(tmp_path, b"\x80\x02" + module(s("w") + tensor(numel=numel)) + b"."))


def test_compressed_pickle_and_storage(tmp_path):
    refused(archive(tmp_path, deflate=("a/data.pkl",)), "compressed")
    refused(archive(tmp_path, deflate=("a/data/0",), name="b.pt"), "compressed")


def test_deeply_nested_lists(tmp_path):
    deep = b"\x80\x02" + b"]" * 100_000 + b"a" * 99_999 + b"."
    refused(archive(tmp_path, deep))
    deep_tuples = b"\x80\x02" + b"(" * 100_000 + b"t" * 100_000 + b"."
    refused(archive(tmp_path, deep_tuples, name="t.pt"))


@pytest.mark.parametrize(
    "code",
    [
        b"\xff\xfe\x00garbage",
        "class M(Module):\n  __parameters__ = [\n",
        "class M(Module):\n  __parameters__ = " + "[" * 100_000 + "]" * 100_000 + "\n",
        'print("hi")\n' + CODE,
        CODE + "<<<>>>\n",
        CODE.replace("class M(Module):", "class M(Module)"),
        CODE + "  w2 : Tensor\0\n",
        "class M(Module):\n  __parameters__ = 3\n",
        'class M(Module):\n  __parameters__ = [__import__("os").system("id")]\n',
    ],
)
def test_garbage_code_files(tmp_path, code):
    refused(archive(tmp_path, code=code))


def test_code_is_never_executed(tmp_path, capfd):
    code = CODE + '  def __init__(self: __torch__.M) -> NoneType:\n    print("RAN")\n'
    code += 'import os\ndef f() -> NoneType:\n  os.system("echo RAN")\n  print("RAN")\n'
    read_torchscript(archive(tmp_path, code=code))
    assert "RAN" not in capfd.readouterr().out


def test_long_code_lines_parse_quickly(tmp_path):
    lines = "  a : b" + " " * 200_000 + "x\n  c :" + " =" * 100_000 + "\n"
    assert list(read_torchscript(archive(tmp_path, code=CODE + lines)).tensors) == ["w"]
    refused(archive(tmp_path, code=CODE + "class A(" + "):" * 100_000 + "x\n", name="b.pt"))


def test_facts_from_attributes_of_a_class_torch_nn_did_not_write(tmp_path):
    sequence = CODE.replace("class M", "class MyLSTM") + (
        '  mode : Final[str] = "LSTM"\n  hidden_size : Final[int] = 4\n  bias : Final[bool] = 1\n'
    )
    pickled = VALID.replace(b"\nM\n", b"\nMyLSTM\n")
    facts = read_torchscript(archive(tmp_path, pickled, code=sequence)).facts
    assert facts == {"": {"hidden_size": 4}}  # bias is no bool: not claimed
    cell = (
        'class C(Module):\n  __parameters__ = ["weight_ih", ]\n  weight_ih : Tensor\n'
        "  hidden_size : Final[int] = 1\n  input_size : Final[int] = 1\n"
    )
    pickled = b"\x80\x02" + module(s("weight_ih") + tensor(size=(4, 1), stride=(1, 1)), "C") + b"."
    facts = read_torchscript(archive(tmp_path, pickled, code=cell, name="c.pt")).facts
    assert facts == {"": {"input_size": 1, "hidden_size": 1}}  # 4 gates: an LSTMCell


def test_modules_shared_exponentially_often_are_refused(tmp_path):
    code = CODE + (
        'class N(Module):\n  __parameters__ = ["w", ]\n  __buffers__ = []\n  w : Tensor\n'
        "  left : __torch__.N\n  right : __torch__.N\n"
    )
    pickled = b"\x80\x02" + module(s("w") + tensor(), "N") + b"q\x00"
    for _ in range(40):  # each level holds the one below twice: 2**40 paths
        pickled += module(s("w") + tensor() + s("left") + b"h\x00" + s("right") + b"h\x00", "N")
        pickled += b"q\x00"
    refused(archive(tmp_path, pickled + b".", code=code), "modules")


def test_empty_tensors_at_the_end_of_their_storage(tmp_path):
    at_end = b"\x80\x02" + module(s("w") + tensor(offset=4, size=(0,))) + b"."
    assert read_torchscript(archive(tmp_path, at_end)).tensors["w"].shape == (0,)
    beyond = b"\x80\x02" + module(s("w") + tensor(offset=5, size=(0,))) + b"."
    refused(archive(tmp_path, beyond, name="b.pt"), "beyond")
    empty = b"\x80\x02" + module(s("w") + tensor(numel=0, size=(0,))) + b"."
    assert read_torchscript(archive(tmp_path, empty, storages={"0": b""}, name="c.pt")).tensors


def test_undeclared_class_is_refused(tmp_path):
    refused(archive(tmp_path, code="class Other(Module):\n  __parameters__ = []\n"), "declared")


# --- hostile pickles -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "evil",
    [
        # calling a placeholder class, or an allowed function on the wrong things
        b"\x80\x02c__torch__\nM\n)R.",
        b"\x80\x02c__torch__\nM\n" + s("x") + b"\x85\x81.",
        b"\x80\x02ccollections\nOrderedDict\n" + s("ab") + b"\x85R.",
        b"\x80\x02ctorch.jit._pickle\nbuild_intlist\n" + s("ab") + b"\x85R.",
        b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n(" + s("x") + b"K\x00)))\x89NtR.",
        # calling something that is not a global at all
        b"\x80\x02" + s("x") + b")R.",
        b"\x80\x02ctorch\nFloatStorage\n)R.",
        # INST, OBJ, NEWOBJ_EX, EXT1, out-of-band buffers
        b"(i__torch__\nM\n.",
        b"\x80\x02(c__torch__\nM\no.",
        b"\x80\x04c__torch__\nM\n)}\x92.",
        b"\x80\x02\x82\x01.",
        b"\x80\x05\x97.",
        # BUILD on a tensor, a dict, a placeholder twice; items into non-containers
        b"\x80\x02" + tensor() + b"}b.",
        b"\x80\x02}}b.",
        b"\x80\x02c__torch__\nM\n)\x81}b}b.",
        b"\x80\x02" + tensor() + s("k") + s("v") + b"s.",
        b"\x80\x02c__torch__\nM\n)\x81(" + s("k") + s("v") + b"u.",
        b"\x80\x02" + tensor() + s("v") + b"a.",
        # persistent ids of the wrong shape
        b"\x80\x02" + s("0") + b"Q.",
        b"\x80\x02(" + s("storage") + b"ctorch\nFloatStorage\n" + s("0") + b"tQ.",
        b"\x80\x02(" + s("storage") + s("FloatStorage") + s("0") + s("cpu") + b"K\x04tQ.",
        b"\x80\x02(" + s("storage") + b"ctorch\nFloatStorage\nK\x00" + s("cpu") + b"K\x04tQ.",
        b"\x80\x02P0\n.",
        # the root is not a module, or a module that holds itself
        b"\x80\x02" + tensor() + b".",
        b"\x80\x02c__torch__\nM\n)\x81q\x00}(" + s("w") + tensor() + s("me") + b"h\x00ub.",
        b"\x80\x02" + module(s("w") + s("not a tensor")) + b".",
        b"\x80\x02" + module(s("v") + tensor()) + b".",
        b"",
        b"\x80\x02",
        b"\x80\x02" + b"J\xff\xff\xff\x7fr\xff\xff\xff\xff" * 3 + b".",
    ],
)
def test_hostile_pickles_are_refused(tmp_path, evil, capfd):
    refused(archive(tmp_path, evil))
    assert capfd.readouterr() == ("", "")


def test_a_module_that_restores_itself_is_refused_when_it_holds_weights(tmp_path):
    code = CODE + "  def __setstate__(self: __torch__.M, state: Tensor) -> NoneType:\n"
    code += "    self.w = state\n    return None\n"
    evil = b"\x80\x02c__torch__\nM\n)\x81" + tensor() + b"b."
    refused(archive(tmp_path, evil, code=code), "__setstate__")


def test_symlinks_to_devices_and_fifos(tmp_path):
    link = tmp_path / "zero.pt"
    link.symlink_to("/dev/zero")
    refused(link, "regular file")
    assert not is_torchscript(link)
    fifo = tmp_path / "fifo.pt"
    os.mkfifo(fifo)
    refused(fifo, "regular file")
    refused(tmp_path, "regular file")


def _entries(path: Path) -> dict[str, zipfile.ZipInfo]:
    with zipfile.ZipFile(path) as z:
        return {i.filename: i for i in z.infolist()}


def _central_directory(data: bytes) -> int:
    return struct.unpack_from("<I", data, data.rindex(b"PK\x05\x06") + 16)[0]


def test_overlapping_and_out_of_range_entries(tmp_path):
    path = archive(tmp_path)
    data = bytearray(path.read_bytes())
    entries = _entries(path)
    directory = _central_directory(bytes(data))
    headers = {}  # entry name -> offset of its central directory record
    at = directory
    while data[at : at + 4] == b"PK\x01\x02":
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", data, at + 28)
        headers[data[at + 46 : at + 46 + name_len].decode()] = at
        at += 46 + name_len + extra_len + comment_len

    overlap = bytearray(data)  # a/data/0 points at data.pkl's local header
    offset = entries["a/data.pkl"].header_offset
    struct.pack_into("<I", overlap, headers["a/data/0"] + 42, offset)
    (tmp_path / "overlap.pt").write_bytes(overlap)
    refused(tmp_path / "overlap.pt")

    huge = bytearray(data)  # a/data/0 declares 4 GB
    struct.pack_into("<II", huge, headers["a/data/0"] + 20, 2**32 - 2, 2**32 - 2)
    (tmp_path / "huge.pt").write_bytes(huge)
    refused(tmp_path / "huge.pt")

    beyond = bytearray(data)  # a local header offset beyond the file
    struct.pack_into("<I", beyond, headers["a/data.pkl"] + 42, len(data) + 100)
    (tmp_path / "beyond.pt").write_bytes(beyond)
    refused(tmp_path / "beyond.pt")


def test_duplicate_entries(tmp_path):
    path = tmp_path / "dup.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("a/data.pkl", VALID)
        z.writestr("a/code/__torch__.py", CODE)
        z.writestr("a/data/0", WEIGHTS)
        with pytest.warns(UserWarning):
            z.writestr("a/data/0", b"\0" * 16)
    refused(path, "twice")


def test_big_endian_archives_are_refused(tmp_path):
    path = archive(tmp_path)
    with zipfile.ZipFile(path, "a") as z:
        z.writestr("a/byteorder", "big")
    refused(path, "endian")


def test_load_checkpoint_reads_scripted_archives(tmp_path):
    path, model = save(tmp_path, "nested")
    ckpt = load_checkpoint(path)
    assert ckpt.format == "torchscript"
    assert list(ckpt.tensors) == list(model.state_dict())


# --- fuzzing ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_archive(tmp_path_factory) -> tuple[bytes, int, int]:
    """A scripted RNNCell's archive, and where its data.pkl lies in it."""
    path = tmp_path_factory.mktemp("fuzz") / "cell.pt"
    torch.manual_seed(0)
    torch.jit.script(nn.RNNCell(2, 3)).save(str(path))
    data = path.read_bytes()
    info = next(i for i in _entries(path).values() if i.filename.endswith("/data.pkl"))
    start = data.index(b"\x80\x02", info.header_offset)
    return data, start, info.file_size


@pytest.mark.slow
@FUZZ
@given(st.data())
def test_fuzzed_archives_read_or_refuse(tmp_path, small_archive, data):
    raw, start, size = small_archive
    mutated = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 8))):
        where = data.draw(
            st.one_of(st.integers(start, start + size - 1), st.integers(0, len(raw) - 1))
        )
        mutated[where] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        del mutated[data.draw(st.integers(0, len(mutated))) :]
    path = tmp_path / "fuzzed.pt"
    path.write_bytes(mutated)
    try:
        read_torchscript(path)
    except CheckpointError as exc:
        assert "\n" not in str(exc)
