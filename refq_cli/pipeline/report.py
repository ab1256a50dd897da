"""The conversion report: per-weight error, per-module output error on a probe, totals.

``weight_stats`` and ``probe_module`` compute; ``to_markdown`` renders. The JSON report is the
plain data; both are deterministic for the same input, spec and probe.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from refq_cli.errors import RefqError, markdown_cell, printable
from refq_cli.quant.numerics import WeightQParams, _for_rows, quantize_blocks, row_sums_of_squares

PROBE_STEPS = 16
PROBE_BATCH = 4


def sqnr_db(reference: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB; inf when equal, -inf when the signal is 0."""
    return _db(_energy(reference), _energy(reference.float() - test.float()))


def _energy(t: torch.Tensor) -> float:
    """Sum of squares in float64, the same whatever the thread count (a float32 dot product's
    last digits change with it, and so would the report's and the artifact's bytes)."""
    return float(row_sums_of_squares(t.detach().reshape(1, -1))[0])


def _db(signal: float, noise: float) -> float:
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10 * math.log10(signal / noise)


def weight_stats(weight: torch.Tensor, qp: WeightQParams, decomposed: bool) -> dict[str, Any]:
    """SQNR, error and clipping of one weight under its quantization parameters."""
    return quantize_and_measure(weight, qp, decomposed)[1]


def quantize_and_measure(
    weight: torch.Tensor,
    qp: WeightQParams,
    decomposed: bool,
    on_codes: Callable[[torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The fake-quantized weight (in the weight's dtype) and :func:`weight_stats`, in one pass.

    ``on_codes`` hears each block's integer codes, in row-major order: the converter streams
    them into the artifact, so the whole weight's codes never sit in memory.
    """
    w = weight.detach()
    qp.check_weight(w)
    values = torch.empty_like(w, memory_format=torch.contiguous_format)
    # dims along which the parameters do not vary: reducing a block over them bounds its values
    varying = qp.axis % w.dim() if qp.per_channel else None
    flat = tuple(d for d in range(w.dim()) if d != varying)
    signal = noise = max_error = 0.0
    clipped = 0
    pairs = None  # each block and its error, one buffer for all: fresh memory costs page faults
    for rows, codes, block_values in quantize_blocks(w, qp, decomposed=decomposed):
        if on_codes is not None:
            on_codes(codes)
        values[rows] = block_values
        if not codes.numel():
            continue
        block = w[rows].float()
        if pairs is None:
            pairs = torch.empty(2, block.numel(), device=block.device)
        pair = pairs[:, : block.numel()]
        pair[0].copy_(block.reshape(-1))
        error = torch.sub(
            block,
            block_values if values.dtype == torch.float32 else values[rows].float(),
            out=pair[1].view(block.shape),
        )
        lo, hi = torch.aminmax(error)
        max_error = max(max_error, -lo.item(), hi.item())
        # sums the thread count does not change (a dot product's does); the pair is scratch
        block_signal, block_noise = row_sums_of_squares(pair, in_place=True).tolist()
        signal += block_signal  # the blocks add up in their order, fixed by the weight's shape
        noise += block_noise
        step = _for_rows(qp, qp.scale, w.dim(), rows)
        zero = _for_rows(qp, qp.zero_point, w.dim(), rows).float()
        # Clipped: beyond half a step outside the codes' range, where rounding alone cannot reach.
        low, high = (qp.quant_min - zero - 0.5) * step, (qp.quant_max - zero + 0.5) * step
        if not flat or not (
            bool((block.amin(flat, keepdim=True) >= low).all())
            and bool((block.amax(flat, keepdim=True) <= high).all())
        ):
            clipped += int(torch.count_nonzero((block < low) | (block > high)))
    return values, {
        "shape": list(w.shape),
        "qscheme": qp.qscheme,
        "dtype": qp.dtype,
        "axis": qp.axis if qp.per_channel else None,
        "quant_min": qp.quant_min,
        "quant_max": qp.quant_max,
        "scale_min": qp.scale.min().item(),
        "scale_max": qp.scale.max().item(),
        "zero_point_min": int(qp.zero_point.min()),
        "zero_point_max": int(qp.zero_point.max()),
        "sqnr_db": _finite(_db(signal, noise)),
        "max_abs_error": max_error,
        "clipped_fraction": clipped / max(1, w.numel()),
    }


def _finite(x: float) -> float | None:
    """JSON has no infinity: an exact (error-free) result is reported as null."""
    return x if math.isfinite(x) else None


def probe_input(module: nn.Module, seed: int = 0) -> torch.Tensor:
    """A seeded normal input for ``module``: (steps, batch, features) in its layout."""
    gen = torch.Generator().manual_seed(seed)
    weight = next(module.parameters())
    x = torch.randn(PROBE_STEPS, PROBE_BATCH, module.input_size, generator=gen)
    if getattr(module, "batch_first", False):
        x = x.transpose(0, 1)
    return x.to(device=weight.device, dtype=weight.dtype)


def probe_for(module: nn.Module, given: torch.Tensor | None, path: str) -> torch.Tensor:
    """The calibration input given for ``module``, checked, or else the seeded random probe."""
    if given is None:
        return probe_input(module)
    layout = (
        "(batch, time, features)"
        if getattr(module, "batch_first", False)
        else ("(time, batch, features)")
    )
    if given.dim() != 3 or given.shape[-1] != module.input_size or 0 in given.shape:
        raise RefqError(
            f"--calibration: input for {path or '<root>'} must be a non-empty {layout} tensor "
            f"with {module.input_size} features, got shape {tuple(given.shape)}"
        )
    if not given.is_floating_point() or not bool(torch.isfinite(given).all()):
        raise RefqError(
            f"--calibration: input for {path or '<root>'} must hold finite floating-point values"
        )
    weight = next(module.parameters())
    return given.to(device=weight.device, dtype=weight.dtype)


def probe_module(float_mod: nn.Module, ref_mod: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """Output error of the reference module against the float one, and its drift over time.

    ``x`` is (steps, batch, features), or (batch, steps, features) for batch_first modules;
    cells are run step by step over its first axis, feeding back their own hidden state.
    """
    cell = isinstance(float_mod, nn.RNNCellBase)
    expected, got = module_output(float_mod, x, cell), module_output(ref_mod, x, cell)
    return probe_result(expected, got, x, getattr(float_mod, "batch_first", False))


def module_output(module: nn.Module, x: torch.Tensor, cell: bool) -> torch.Tensor:
    """The output sequence of ``module`` on ``x``, in the module's layout; a cell unrolled."""
    with torch.no_grad():
        return _unroll(module, x) if cell else module(x)[0]


def probe_result(
    expected: torch.Tensor, got: torch.Tensor, x: torch.Tensor, batch_first: bool
) -> dict[str, Any]:
    """The report's probe entries from the float and reference outputs on probe ``x``."""
    if batch_first:
        expected, got = expected.transpose(0, 1), got.transpose(0, 1)
    per_step = (expected - got).abs().flatten(1).amax(dim=1)
    return {
        "probe_shape": list(x.shape),
        "output_sqnr_db": _finite(sqnr_db(expected, got)),
        "output_max_abs_error": per_step.max().item(),
        "hidden_error_per_step": [round(v, 9) for v in per_step.tolist()],
    }


def _unroll(cell: nn.Module, x: torch.Tensor) -> torch.Tensor:
    hx = None
    outputs = []
    for step in x:
        hx = cell(step, hx)
        outputs.append(hx[0] if isinstance(hx, tuple) else hx)
    return torch.stack(outputs)


def _fmt(value: Any) -> str:
    if value is None:
        return "exact"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def to_markdown(report: dict[str, Any]) -> str:
    """The report for people and CI step summaries."""
    source = report["source"]
    totals = report["totals"]
    lines = [
        f"# refq conversion report: {printable(source['name'])}",
        "",
        f"- source sha256: `{source['sha256']}` ({source['format']})",
        f"- spec: `{printable(report['spec'])}`",
        f"- bytes: {totals['float_bytes']:,} float -> {totals['quantized_bytes']:,} quantized "
        f"({totals['compression_ratio']:.2f}x smaller)",
        f"- worst weight SQNR: {_fmt(totals['worst_sqnr_db'])} dB over "
        f"{totals['weights_quantized']} quantized weights",
        f"- conversion time: {totals['seconds']:.2f} s",
        *_assumed_lines(report.get("assumed_facts") or {}),
        "",
        "## Weights",
        "",
        "| module | weight | shape | qscheme | dtype | scale | zero point | SQNR dB | "
        "max abs err | clipped |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for w in report["weights"]:
        scale = _range(w["scale_min"], w["scale_max"])
        zp = _range(w["zero_point_min"], w["zero_point_max"])
        lines.append(
            f"| {markdown_cell(w['module'] or '<root>')} | {w['weight']} | "
            f"{'x'.join(map(str, w['shape']))} | "
            f"{w['qscheme']} | {w['dtype']} | {scale} | {zp} | {_fmt(w['sqnr_db'])} | "
            f"{_fmt(w['max_abs_error'])} | {w['clipped_fraction']:.2%} |"
        )
    lines += [
        "",
        "## Modules (probe input)",
        "",
        "| module | float | reference | output SQNR dB | max abs err | error at last step |",
        "|---|---|---|---|---|---|",
    ]
    for m in report["modules"]:
        if m["skipped"]:
            lines.append(
                f"| {markdown_cell(m['path'] or '<root>')} | {m['float_type']} | kept float | | | |"
            )
            continue
        lines.append(
            f"| {markdown_cell(m['path'] or '<root>')} | {m['float_type']} | "
            f"{m['reference_type']} | "
            f"{_fmt(m['output_sqnr_db'])} | {_fmt(m['output_max_abs_error'])} | "
            f"{_fmt(m['hidden_error_per_step'][-1])} |"
        )
    return "\n".join(lines) + "\n"


def _assumed_lines(assumed: dict[str, dict[str, Any]]) -> list[str]:
    """The facts weights cannot tell that were assumed, and where the spec sets them."""
    if not assumed:
        return []
    named = "; ".join(  # sorted, as the report's JSON is
        f"{printable(path)}: " + ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(facts.items()))
        for path, facts in sorted(assumed.items())
    )
    return [f"- assumed, as weights cannot tell (set them under `modules:` in the spec): {named}"]


def _range(lo: Any, hi: Any) -> str:
    return _fmt(lo) if lo == hi else f"{_fmt(lo)} .. {_fmt(hi)}"
