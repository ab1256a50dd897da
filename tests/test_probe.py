"""How the probe runs its modules: the float and the reference module at once, each on one
thread of PyTorch's native kernels, with torch's settings as they were once it is done; a
module with calibrated weights one module after the other, as torch is set."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from refq_cli.pipeline.probe import (
    call_output,
    default_outputs,
    measured_outputs,
    probe_calls,
    random_call,
)
from refq_cli.quant.observers import observe
from refq_cli.reference.registry import converter_for
from refq_cli.spec.spec import ProbeSetting, QParamSpec

INT8 = QParamSpec("qint8", "per_channel_symmetric", 0, "minmax", 99.99)


@pytest.fixture
def settings() -> Iterator[None]:
    """Two threads and oneDNN on, as a test sets them; torch's settings back afterwards."""
    threads, onednn = torch.get_num_threads(), torch.backends.mkldnn.enabled
    torch.set_num_threads(2)
    torch.backends.mkldnn.enabled = True
    yield
    torch.set_num_threads(threads)
    torch.backends.mkldnn.enabled = onednn


def _pair() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    module = nn.LSTM(64, 128, num_layers=2).eval()
    qparams: dict = {"is_decomposed": False}
    for name, w in module.named_parameters():
        if name.startswith("weight"):
            qparams[name] = observe(w, INT8, name)
    return module, converter_for(module)(module, qparams).eval()


def _record_threads(module: nn.Module, seen: list[tuple[str, int]]) -> None:
    module.register_forward_pre_hook(
        lambda *_: seen.append((threading.current_thread().name, torch.get_num_threads()))
    )


def _calls(module: nn.Module):
    return [random_call(module, ProbeSetting(steps=5, sequences=3))]


def test_the_probe_runs_both_modules_at_once_each_on_one_thread(settings):
    float_mod, ref = _pair()
    seen: dict[str, list] = {"float": [], "ref": []}
    _record_threads(float_mod, seen["float"])
    _record_threads(ref, seen["ref"])
    calls = _calls(float_mod)
    measured_outputs(float_mod, calls, ref, calls, cell=False)
    [(float_thread, float_threads)], [(ref_thread, ref_threads)] = seen["float"], seen["ref"]
    assert float_thread != ref_thread and float_thread.startswith("refq probe")
    assert ref_thread.startswith("refq probe") and float_threads == ref_threads == 1
    assert torch.get_num_threads() == 2 and torch.backends.mkldnn.enabled


def test_a_thread_that_starts_using_torch_during_a_probe_gets_torchs_thread_count(settings):
    float_mod, ref = _pair()
    seen: list[int] = []

    def first_use() -> None:
        seen.append(torch.get_num_threads())

    def start_a_thread(*_) -> None:
        newcomer = threading.Thread(target=first_use)
        newcomer.start()
        newcomer.join()

    float_mod.register_forward_pre_hook(start_a_thread)
    calls = _calls(float_mod)
    measured_outputs(float_mod, calls, ref, calls, cell=False)
    assert seen == [2]


def test_a_default_kernel_pass_in_another_thread_waits_for_a_probe(settings):
    """A calibrated conversion in one thread while another probes: its float layers run on
    oneDNN, as its codes were always fitted, not on the probe's kernels."""
    float_mod, ref = _pair()
    other_mod, _ = _pair()
    seen: list[bool] = []

    def record(*_) -> None:
        seen.append(torch.backends.mkldnn.enabled)

    other_mod.register_forward_pre_hook(record)
    other = threading.Thread(target=default_outputs, args=(other_mod, _calls(other_mod), False))

    def start_the_other(*_) -> None:
        other.start()
        other.join(timeout=0.5)  # it waits for the probe, so it is still waiting here

    float_mod.register_forward_pre_hook(start_the_other)
    calls = _calls(float_mod)
    measured_outputs(float_mod, calls, ref, calls, cell=False)
    other.join(timeout=30)
    assert seen == [True]


def test_the_probe_gives_what_one_thread_of_the_native_kernels_gives(settings):
    float_mod, ref = _pair()
    calls = _calls(float_mod)
    expected, got = measured_outputs(float_mod, calls, ref, calls, cell=False)
    torch.set_num_threads(1)
    torch.backends.mkldnn.enabled = False
    for module, (output, states) in ((float_mod, expected[0]), (ref, got[0])):
        want, want_states = call_output(module, calls[0], cell=False)
        assert torch.equal(output, want)
        assert all(torch.equal(s, w) for s, w in zip(states, want_states, strict=True))


def test_with_one_thread_the_probe_runs_one_module_after_the_other_to_the_same_figures(settings):
    float_mod, ref = _pair()
    calls = _calls(float_mod)
    paired = measured_outputs(float_mod, calls, ref, calls, cell=False)
    seen: list[tuple[str, int]] = []
    _record_threads(float_mod, seen)
    _record_threads(ref, seen)
    torch.set_num_threads(1)
    alone = measured_outputs(float_mod, calls, ref, calls, cell=False)
    assert seen == [(threading.current_thread().name, 1)] * 2
    for side in (0, 1):  # the float module's outputs, then the reference module's
        (output, states), (again, again_states) = paired[side][0], alone[side][0]
        assert torch.equal(output, again)
        assert all(torch.equal(a, b) for a, b in zip(states, again_states, strict=True))
    assert torch.get_num_threads() == 1 and torch.backends.mkldnn.enabled


def test_a_calibrated_module_is_probed_as_torch_is_set(settings):
    float_mod, ref = _pair()
    seen: list[tuple[str, int]] = []
    _record_threads(float_mod, seen)
    _record_threads(ref, seen)
    calls = _calls(float_mod)
    expected, _ = measured_outputs(float_mod, calls, ref, calls, cell=False, calibrated=True)
    assert seen == [(threading.current_thread().name, 2)] * 2
    assert torch.equal(expected[0][0], call_output(float_mod, calls[0], cell=False)[0])


def test_a_failing_probe_leaves_torchs_settings_as_they_were(settings):
    float_mod, ref = _pair()

    def fail(*_):
        raise ValueError("broken module")

    ref.register_forward_pre_hook(fail)
    calls = _calls(float_mod)
    with pytest.raises(ValueError, match="broken module"):
        measured_outputs(float_mod, calls, ref, calls, cell=False)
    assert torch.get_num_threads() == 2 and torch.backends.mkldnn.enabled


def _in_a_fresh_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1]
    )


def test_a_probe_runs_once_the_interpreter_is_shutting_down():
    """From a thread still converting when the main script has ended."""
    code = (
        "import threading, time\n"
        "from tests.test_probe import _pair\n"
        "from refq_cli.pipeline.probe import probe_calls\n"
        "float_mod, ref = _pair()\n"
        "def late():\n"
        "    time.sleep(0.5)\n"
        "    print(probe_calls(float_mod, ref, None)['output_sqnr_db'] > 20)\n"
        "threading.Thread(target=late).start()\n"
    )
    result = _in_a_fresh_python(code)
    assert result.returncode == 0 and result.stdout.strip() == "True", result.stderr


def test_flags_frozen_during_a_probe_do_not_fail_it():
    code = (
        "import torch\n"
        "from tests.test_probe import _pair\n"
        "from refq_cli.pipeline.probe import probe_calls\n"
        "float_mod, ref = _pair()\n"
        "float_mod.register_forward_pre_hook(lambda *_: torch.backends.disable_global_flags())\n"
        "assert 20 < probe_calls(float_mod, ref, None)['output_sqnr_db'] < 80\n"
    )
    result = _in_a_fresh_python(code)
    assert result.returncode == 0, result.stderr


def test_the_probe_runs_where_torchs_flags_are_frozen():
    code = (
        "import torch\n"
        "from tests.test_probe import _pair\n"
        "from refq_cli.pipeline.probe import probe_calls\n"
        "torch.backends.disable_global_flags()\n"
        "float_mod, ref = _pair()\n"
        "row = probe_calls(float_mod, ref, None)\n"
        "assert 20 < row['output_sqnr_db'] < 80, row\n"
        "assert torch.backends.mkldnn.enabled\n"
    )
    result = _in_a_fresh_python(code)
    assert result.returncode == 0, result.stderr


def test_both_ways_measure_the_same_error(settings):
    float_mod, ref = _pair()
    paired = probe_calls(float_mod, ref, None)
    sequential = probe_calls(float_mod, ref, None, calibrated=True)
    assert paired["probe_shape"] == sequential["probe_shape"]
    # the same error, measured on other kernels: close, not necessarily equal
    assert paired["output_sqnr_db"] == pytest.approx(sequential["output_sqnr_db"], abs=1e-3)


def test_probes_in_two_threads_leave_torchs_settings_as_they_were(settings):
    """A program that converts in two threads: the second probe starts while the first runs
    and ends after it; torch's thread count and oneDNN are as they were before either."""
    first, first_ref = _pair()
    second, second_ref = _pair()
    first_done = threading.Event()
    failures: list[BaseException] = []

    def second_probe() -> None:
        try:
            calls = _calls(second)
            measured_outputs(second, calls, second_ref, calls, cell=False)
        except BaseException as exc:  # reported by the test
            failures.append(exc)

    other = threading.Thread(target=second_probe)

    def wait_for_the_first(*_) -> None:
        first_done.wait(timeout=5)

    def start_the_second(*_) -> None:
        other.start()

    second.register_forward_pre_hook(wait_for_the_first)
    first.register_forward_pre_hook(start_the_second)
    calls = _calls(first)
    measured_outputs(first, calls, first_ref, calls, cell=False)
    first_done.set()
    other.join(timeout=30)
    assert not other.is_alive() and not failures
    assert torch.get_num_threads() == 2 and torch.backends.mkldnn.enabled
