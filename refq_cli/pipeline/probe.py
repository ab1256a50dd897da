"""Probing a module: its output error against the float module on a seeded random input or on
calibration data, and the drift of that error over time steps."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Mapping, Sequence
from typing import Any, TypedDict

import torch
from torch import nn

from refq_cli.errors import ConversionError
from refq_cli.pipeline.calibration import Call, batched
from refq_cli.quant.statistics import finite, sqnr_db
from refq_cli.spec.spec import ProbeSetting


class ProbeResult(TypedDict):
    """A module's output error against the float module on a probe."""

    probe_shape: list[int]
    output_sqnr_db: float | None  # None: exact
    output_max_abs_error: float
    hidden_error_per_step: list[float]


class CalibrationPart(TypedDict, total=False):
    """The output error on one part of the calibration calls (fit: those the Hessians came
    from; held out: the others), and with a rounding other than nearest, nearest's."""

    sequences: int
    rows: int
    output_sqnr_db: float | None  # the output sequences of every call
    hidden_sqnr_db: float | None  # the final states (h_n, c_n of every layer)
    nearest_output_sqnr_db: float | None
    nearest_hidden_sqnr_db: float | None


class CalibrationResult(TypedDict):
    fit: CalibrationPart
    held_out: CalibrationPart | None  # None: too few sequences to hold any out


DEFAULT_PROBE = ProbeSetting()


CallOutputs = list[tuple[torch.Tensor, tuple]]  # call_output of each call: output, final states


def measured_outputs(
    float_mod: nn.Module,
    float_calls: Sequence[Call],
    ref_mod: nn.Module,
    ref_calls: Sequence[Call],
    cell: bool,
    calibrated: bool = False,
) -> tuple[CallOutputs, CallOutputs]:
    """:func:`call_output` of the float module on each of ``float_calls`` and of the reference
    module on each of ``ref_calls``, for a probe to compare.

    On the CPU the two run at once, each in a thread of its own on one thread of PyTorch's
    native recurrent kernels (oneDNN off, which copies an LSTM layer's weights into its own
    layout on every call), or one after the other where torch has one thread (a ``--jobs``
    worker's): the probe of the 576 MB benchmark checkpoint takes about 0.8x the time of one
    module after the other on all threads (``benchmarks/probe_cost.py``). One thread's matrix
    products add in one order, so the figures are the same whatever the machine's thread count
    (the native kernels on two threads gave other last digits in about one process in ten).
    Meanwhile oneDNN is off for the whole process (PyTorch has one switch; it stays on where
    PyTorch's flags are frozen, ``torch.backends.disable_global_flags``), and torch's thread
    count is 1 only while the two threads take theirs.

    A module with ``calibrated`` weights, or on a GPU, runs one module after the other on
    PyTorch's default kernels (:func:`default_outputs`): a calibrated module's codes come from
    its float layers' outputs on them, and its report measures on the same outputs.
    """
    if calibrated or next(float_mod.parameters()).device.type != "cpu":
        return (
            default_outputs(float_mod, float_calls, cell),
            default_outputs(ref_mod, ref_calls, cell),
        )
    runs = [(float_mod, float_calls), (ref_mod, ref_calls)]
    with _KERNELS:  # no other thread's probe or default-kernel pass meanwhile
        threads, onednn = torch.get_num_threads(), torch.backends.mkldnn.enabled
        try:
            with contextlib.suppress(RuntimeError):  # frozen flags: oneDNN, on one thread too
                torch.backends.mkldnn.enabled = False
            if threads < 2:  # one thread given (a --jobs worker's): one module at a time
                return _run(*runs[0], cell), _run(*runs[1], cell)
            return _each_in_a_thread(runs, cell, threads)
        finally:
            if torch.backends.mkldnn.enabled != onednn:
                with contextlib.suppress(RuntimeError):  # frozen meanwhile: it stays off
                    torch.backends.mkldnn.enabled = onednn


def default_outputs(module: nn.Module, calls: Sequence[Call], cell: bool) -> CallOutputs:
    """:func:`call_output` of ``module`` on each of ``calls`` on PyTorch's default kernels,
    once no probe in another thread has oneDNN off: what calibrated weights are fitted and
    measured on."""
    with _KERNELS:
        return _run(module, calls, cell)


def _run(module: nn.Module, calls: Sequence[Call], cell: bool) -> CallOutputs:
    return [call_output(module, c, cell) for c in calls]


def _each_in_a_thread(
    runs: Sequence[tuple[nn.Module, Sequence[Call]]], cell: bool, threads: int
) -> tuple[CallOutputs, CallOutputs]:
    """Each ``(module, calls)`` of ``runs`` in a thread of its own at one torch thread; torch's
    count is back to ``threads`` as soon as both have taken theirs, so that a thread that first
    uses torch meanwhile does not keep one thread for good. Errors are raised once both are
    done (a KeyboardInterrupt at once: the threads are daemons)."""
    results: list[Any] = [None] * len(runs)
    ready = [threading.Event() for _ in runs]
    go = threading.Event()  # once torch's count is back

    def work(i: int) -> None:
        try:
            torch.set_num_threads(1)  # also MKL's count, which PyTorch sets per thread
            torch.get_num_threads()  # this thread's count is taken: no later lazy start at 2
        finally:
            ready[i].set()
        go.wait()
        try:
            results[i] = (True, _run(*runs[i], cell))
        except BaseException as exc:  # raised by the caller
            results[i] = (False, exc)

    workers = [
        threading.Thread(target=work, args=(i,), name=f"refq probe {i}", daemon=True)
        for i in range(len(runs))
    ]
    started = []
    try:
        try:
            for worker in workers:
                worker.start()
                started.append(worker)
        except RuntimeError:  # no new threads: the interpreter is shutting down
            pass
        for event, worker in zip(ready, workers, strict=True):
            if worker in started:
                event.wait()
    finally:
        torch.set_num_threads(threads)
        go.set()
    for worker in started:
        worker.join()
    if len(started) < len(workers):  # here instead, one module after the other
        torch.set_num_threads(1)
        try:
            return _run(*runs[0], cell), _run(*runs[1], cell)
        finally:
            torch.set_num_threads(threads)
    for ok, value in results:
        if not ok:
            raise value
    return results[0][1], results[1][1]


_KERNELS = threading.RLock()  # held while torch's kernels are as a probe or a fit needs them


def random_call(module: nn.Module, setting: ProbeSetting, seed: int = 0) -> Call:
    """The seeded random probe for ``module`` when no calibration inputs are given: a normal
    (steps, sequences, features) input from zero states."""
    gen = torch.Generator().manual_seed(seed)
    weight = next(module.parameters())
    x = torch.randn(setting.steps, setting.sequences, module.input_size, generator=gen)
    return Call(x.to(device=weight.device, dtype=weight.dtype), None, None)


def probe_shape(module: nn.Module, calls: Sequence[Call]) -> list[int]:
    """How the report gives the probe's shape: (steps, sequences, features) of the longest
    call and all sequences, or (sequences, steps, features) for a batch_first module."""
    sequences = sum(c.sequences for c in calls)
    steps = max(c.input.shape[0] for c in calls)
    shape = [sequences, steps] if getattr(module, "batch_first", False) else [steps, sequences]
    return [*shape, calls[0].input.shape[-1]]


def probe_calls(
    float_mod: nn.Module,
    ref_mod: nn.Module,
    calls: Sequence[Call] | None,
    setting: ProbeSetting = DEFAULT_PROBE,
    where: str = "module",
    calibrated: bool = False,
) -> ProbeResult:
    """Output error of the reference module against the float one on calibration calls (the
    random probe of ``setting``'s size when None), and its drift over time steps; ``where``
    names the module in errors; ``calibrated``: whether its codes came from calibration inputs
    (see :func:`measured_outputs`)."""
    calibration = bool(calls)
    calls = calls or [random_call(float_mod, setting)]
    calls, _ = batched(calls)
    cell = isinstance(float_mod, nn.RNNCellBase)
    expected, got = measured_outputs(float_mod, calls, ref_mod, calls, cell, calibrated)
    outputs = {"float": [o for o, _ in expected], "quantized": [o for o, _ in got]}
    check_finite(outputs, where, calibration)
    return calls_result(outputs["float"], outputs["quantized"], probe_shape(float_mod, calls))


def _unrolled(cell: nn.Module, x: torch.Tensor, hx: Any) -> tuple[torch.Tensor, tuple]:
    outputs = []
    for step in x:
        hx = cell(step, hx)
        outputs.append(hx[0] if isinstance(hx, tuple) else hx)
    return torch.stack(outputs), hx if isinstance(hx, tuple) else (hx,)


def call_output(module: nn.Module, call: Call, cell: bool) -> tuple[torch.Tensor, tuple]:
    """The output sequence (time-major) and the final states (``(h_n,)`` or ``(h_n, c_n)``)
    of ``module`` on one calibration call, from the call's initial states (zeros where it has
    none); a cell unrolled over the call's steps. An LSTM's call has both states or neither
    (:func:`~refq_cli.pipeline.calibration.calls_for` sees to it)."""
    h_0, c_0 = call.h_0, call.c_0
    with torch.no_grad():
        hx = h_0 if c_0 is None else (h_0, c_0)
        if cell:
            return _unrolled(module, call.input, hx)
        batch_first = getattr(module, "batch_first", False)
        x = call.input.transpose(0, 1) if batch_first else call.input
        output, state = module(x, hx)
        output = output.transpose(0, 1) if batch_first else output
        return output, state if isinstance(state, tuple) else (state,)


_RUN_NAMES = {"float": "float", "quantized": "reference", "nearest": "nearest-rounded reference"}


def check_finite(runs: Mapping[str, Sequence[torch.Tensor]], where: str, calibration: bool) -> None:
    """Refuse a probe whose outputs hold NaN or infinity, which no SQNR can describe (it once
    read as exact): ``runs`` the outputs of ``float``, ``quantized`` (and ``nearest``)."""
    for kind, outputs in runs.items():
        if not all(bool(torch.isfinite(o).all()) for o in outputs):
            on = "the calibration inputs" if calibration else "the random probe"
            raise ConversionError(
                f"{where}: the {_RUN_NAMES[kind]} module's output on {on} holds NaN or "
                "infinity (its weights overflow float32 there); probe on the inputs it is "
                "meant for with --calibration, or measure nothing with --probe-steps 0"
            )


def calls_result(
    expected: Sequence[torch.Tensor], got: Sequence[torch.Tensor], shape: list[int]
) -> ProbeResult:
    """The report's probe entries over several calls (time-major outputs): the SQNR over all
    of them, the error per step the largest of the calls that reach that step; ``shape`` the
    probe's shape as the report gives it."""
    steps = max(e.shape[0] for e in expected)
    per_step = torch.zeros(steps, dtype=torch.float64)
    for e, g in zip(expected, got, strict=True):
        error = (e - g).abs().flatten(1).amax(dim=1).double()
        per_step[: error.shape[0]] = torch.maximum(per_step[: error.shape[0]], error)
    return {
        "probe_shape": shape,
        "output_sqnr_db": finite(sqnr_db(_joined(expected), _joined(got))),
        "output_max_abs_error": per_step.max().item(),
        "hidden_error_per_step": [round(v, 9) for v in per_step.tolist()],
    }


def _joined(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def calibration_result(
    masks: Sequence[torch.Tensor],
    runs: Mapping[str, Sequence[torch.Tensor]],
    finals: Mapping[str, Sequence[Sequence[tuple]]],
) -> CalibrationResult:
    """The output and hidden-state SQNR on the fit calls' sequences (``masks``: per call, which
    of its sequences were fit on) and on the held-out ones: ``runs`` the time-major outputs of
    ``float``, ``quantized`` (and ``nearest``), ``finals`` their final states per layer."""

    def part(keep: Sequence[torch.Tensor]) -> CalibrationPart | None:
        if not any(bool(k.any()) for k in keep):
            return None

        def outputs(kind: str) -> torch.Tensor:
            return _joined([o[:, k] for o, k in zip(runs[kind], keep, strict=True)])

        def hidden(kind: str) -> torch.Tensor:
            return _joined(
                [
                    s[:, k] if s.dim() == 3 else s[k]
                    for layers, k in zip(finals[kind], keep, strict=True)
                    for states in layers
                    for s in states
                ]
            )

        result: CalibrationPart = {
            "sequences": sum(int(k.sum()) for k in keep),
            "rows": sum(
                int(k.sum()) * o.shape[0] for o, k in zip(runs["float"], keep, strict=True)
            ),
        }
        for kind, prefix in (("quantized", ""), ("nearest", "nearest_")):
            if kind in runs:
                result[f"{prefix}output_sqnr_db"] = finite(sqnr_db(outputs("float"), outputs(kind)))  # type: ignore[literal-required]
                result[f"{prefix}hidden_sqnr_db"] = finite(sqnr_db(hidden("float"), hidden(kind)))  # type: ignore[literal-required]
        return result

    fit = part(masks)
    assert fit is not None
    return {"fit": fit, "held_out": part([~k for k in masks])}
