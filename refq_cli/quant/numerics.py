"""Quantization math on plain tensors: parameters, quantize, dequantize, fake-quantize.

Notation: ``w`` float weight, ``s`` scale, ``z`` zero point, ``q`` integer code, ``rne`` round
half to even, ``f32(x)`` and ``f64(x)`` rounding to float32 and float64, ``inv = f32(1 / s)``.

refq reproduces, bit for bit, what PyTorch computes for reference-quantized weights. PyTorch's
kernels do not all round the same way, so each path below names the kernel it reproduces. Every
path clamps the codes to ``[quant_min, quant_max]`` afterwards.

Quantize, default path (``torch.quantize_per_tensor`` / ``torch.quantize_per_channel``):

* CPU, per-tensor, 8-bit and 4-bit: ``q = rne(f32(w * inv + z))`` with a single rounding of
  ``w * inv + z``: FBGEMM's vectorised kernel uses a fused multiply-add.
* CPU, per-tensor qint32, and CPU per-channel: ``q = rne(f32(f32(w * inv) + z))``.
* CUDA (both schemes): ``q = rne(f64(w / s)) + z``, the division done in float64.

Quantize, decomposed path (``torch.ops.quantized_decomposed``), on any device:

* per-tensor: ``q = rne(f32(w * f32(f64(1 / s)))) + z`` (the op turns the scale into a Python
  float, so the reciprocal is taken in float64);
* per-channel: ``q = rne(f32(w * inv)) + z``.

Codes are clamped in floating point before they become integers, so values beyond the range
(even infinite ones) saturate at ``quant_min`` / ``quant_max`` as PyTorch's kernels do. NaN
weights get code 0 (clamped into the range), which PyTorch leaves undefined.

Dequantize: either ``f32(f32(q - z) * s)`` with ``q - z`` taken exactly, or
``f32(f32(f32(q) - f32(z)) * s)``. The second is what PyTorch's CPU per-channel kernel, its CUDA
per-tensor kernel and its decomposed per-tensor op compute; the other paths compute the first
(where PyTorch's CPU per-tensor qint32 kernel lets ``q - z`` wrap around in int32, refq keeps it
exact). The two differ only for qint32 codes beyond 2**24.

Nothing here uses PyTorch's quantized dtypes or ``torch.quantize_per_*``, which PyTorch 2.13
deprecates: codes live in ordinary integer tensors.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import operator
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from refq_cli.errors import ExportError, QParamsError, did_you_mean
from refq_cli.kinds import INTEGER_TYPES, SCHEMES

__all__ = [
    "DTYPES",
    "QuantDType",
    "QuantizedWeight",
    "WeightQParams",
    "dequantize",
    "fake_quantize",
    "quantize",
    "quantize_blocks",
    "quantize_with_values",
    "row_sums",
    "row_sums_of_squares",
    "traceable_dequantize",
]


@dataclass(frozen=True)
class QuantDType:
    """A quantized integer type: its name, storage dtype and full range of codes."""

    name: str
    storage: torch.dtype
    qmin: int
    qmax: int


DTYPES: dict[str, QuantDType] = {  # refq_cli.kinds' integer types, with their torch dtypes
    name: QuantDType(name, getattr(torch, t.storage), t.qmin, t.qmax)
    for name, t in INTEGER_TYPES.items()
}

_FIELDS = ("qscheme", "dtype", "scale", "zero_point", "axis", "quant_min", "quant_max")


def canonical_name(value: Any) -> str:
    """``torch.qint8``, ``"torch.qint8"`` and ``"QINT8"`` all become ``"qint8"``.

    None becomes ``"none"``, the qscheme of a weight kept in float.
    """
    if value is None:
        return "none"
    name = str(value).strip().lower()
    return name.removeprefix("torch.")


def _choice(kind: str, value: Any, choices: Mapping[str, Any], where: str) -> str:
    name = canonical_name(value)
    if name in choices:
        return name
    hint = did_you_mean(name, choices, aside=True)
    raise QParamsError(
        f"{where}: unknown {kind} {value!r}{hint}; expected one of {', '.join(choices)}",
        field=kind,
    )


@dataclass(frozen=True, eq=False)
class WeightQParams:
    """How one weight is quantized. Build it with :meth:`create`, which validates.

    ``scale`` is float32 and ``zero_point`` int32, both 0-d for per-tensor schemes and 1-d (one
    entry per channel along ``axis``) for per-channel schemes. Symmetric schemes are stored as
    their affine counterpart with the zero point in the middle of ``[quant_min, quant_max]``.
    """

    qscheme: str
    dtype: str
    scale: torch.Tensor
    zero_point: torch.Tensor
    axis: int
    quant_min: int
    quant_max: int

    @property
    def per_channel(self) -> bool:
        return self.qscheme == "per_channel_affine"

    @property
    def storage(self) -> torch.dtype:
        return DTYPES[self.dtype].storage

    @classmethod
    def create(
        cls,
        *,
        qscheme: Any,
        dtype: Any,
        scale: Any,
        zero_point: Any = None,
        axis: Any = 0,
        quant_min: int | None = None,
        quant_max: int | None = None,
        device: torch.device | str | None = None,
        where: str = "weight",
    ) -> WeightQParams:
        """Validate and normalise quantization parameters; ``where`` names the weight in errors."""
        qscheme, symmetric = SCHEMES[_choice("qscheme", qscheme, SCHEMES, where)]
        qdtype = DTYPES[_choice("dtype", dtype, DTYPES, where)]
        quant_min = qdtype.qmin if quant_min is None else _integer(quant_min, "quant_min", where)
        quant_max = qdtype.qmax if quant_max is None else _integer(quant_max, "quant_max", where)
        if not qdtype.qmin <= quant_min < quant_max <= qdtype.qmax:
            raise QParamsError(
                f"{where}: need {qdtype.qmin} <= quant_min < quant_max <= {qdtype.qmax} for "
                f"{qdtype.name}, got quant_min={quant_min}, quant_max={quant_max}",
                field="quant_min"
                if quant_min < qdtype.qmin or quant_min >= quant_max
                else "quant_max",
            )
        per_channel = qscheme == "per_channel_affine"
        axis = 0 if axis is None and not per_channel else _integer(axis, "axis", where)

        scale_t = _as_tensor(scale, torch.float32, device, "scale", where)
        if not per_channel and scale_t.numel() != 1:
            raise QParamsError(
                f"{where}: {qscheme} takes one scale, got {scale_t.numel()}; "
                "use per_channel_affine for one scale per channel",
                field="scale",
            )
        if scale_t.dim() > 1:
            raise QParamsError(
                f"{where}: scale must be a number or a 1-D list, got shape {tuple(scale_t.shape)}",
                field="scale",
            )
        scale_t = scale_t.reshape(-1) if per_channel else scale_t.reshape(())
        if scale_t.numel() == 0:
            raise QParamsError(f"{where}: scale is empty", field="scale")
        bad = ~(torch.isfinite(scale_t) & (scale_t > 0) & torch.isfinite(1 / scale_t))
        if bool(bad.any()):
            first = scale_t.reshape(-1)[bad.reshape(-1)][0].item()
            raise QParamsError(
                f"{where}: scale must be positive and finite (and so must 1/scale), got {first}",
                field="scale",
            )

        if zero_point is None:
            if not symmetric:
                raise QParamsError(
                    f"{where}: zero_point is required for {qscheme}", field="zero_point"
                )
            zero_point = symmetric_zero_point(qdtype, quant_min, quant_max)
        zp_t = _as_tensor(zero_point, torch.int64, scale_t.device, "zero_point", where)
        if zp_t.numel() == 1:
            zp_t = zp_t.reshape(()).expand(scale_t.shape).clone()
        if zp_t.shape != scale_t.shape and zp_t.reshape(-1).shape != scale_t.shape:
            raise QParamsError(
                f"{where}: zero_point has {zp_t.numel()} entries but scale has {scale_t.numel()}",
                field="zero_point",
            )
        zp_t = zp_t.reshape(scale_t.shape)
        lo, hi = int(zp_t.min()), int(zp_t.max())
        if lo < quant_min or hi > quant_max:
            raise QParamsError(
                f"{where}: zero_point must lie in [{quant_min}, {quant_max}], "
                f"got {lo if lo < quant_min else hi}",
                field="zero_point",
            )
        middle = symmetric_zero_point(qdtype, quant_min, quant_max)
        wrong = zp_t.reshape(-1)[zp_t.reshape(-1) != middle]
        if symmetric and wrong.numel():
            raise QParamsError(
                f"{where}: symmetric schemes need zero_point {middle} for "
                f"[{quant_min}, {quant_max}], got {wrong[0].item()}; "
                "use an affine scheme for another zero point",
                field="zero_point",
            )
        zp_t = zp_t.to(torch.int32)
        return cls(qscheme, qdtype.name, scale_t, zp_t, axis, quant_min, quant_max)

    @classmethod
    def from_mapping(
        cls, entry: Mapping[str, Any], *, device: torch.device | str | None = None, where: str
    ) -> WeightQParams:
        """Build from a PyTorch-style ``weight_qparams`` mapping; unknown keys are errors."""
        unknown = sorted(set(entry) - set(_FIELDS))
        if unknown:
            hint = did_you_mean(unknown[0], _FIELDS, aside=True)
            raise QParamsError(
                f"{where}: unknown key {unknown[0]!r}{hint}; expected keys are {', '.join(_FIELDS)}"
            )
        if "qscheme" not in entry or "dtype" not in entry or "scale" not in entry:
            missing = [k for k in ("qscheme", "dtype", "scale") if k not in entry]
            raise QParamsError(f"{where}: missing {', '.join(missing)}")
        return cls.create(**entry, device=device, where=where)

    def check_weight(self, weight: torch.Tensor, where: str = "weight") -> None:
        """Check that ``axis`` exists in ``weight`` and that there is one scale per channel."""
        if not self.per_channel:
            return
        if not -weight.dim() <= self.axis < weight.dim():
            raise QParamsError(
                f"{where}: axis {self.axis} is out of range for a {weight.dim()}-D weight",
                field="axis",
            )
        channels = weight.shape[self.axis]
        if self.scale.numel() != channels:
            hint = (
                "; for one scale for the whole weight use qscheme per_tensor_affine or "
                "per_tensor_symmetric"
                if self.scale.numel() == 1
                else ""
            )
            raise QParamsError(
                f"{where}: per-channel scale has {self.scale.numel()} entries but the weight "
                f"has {channels} channels along axis {self.axis} (shape {tuple(weight.shape)})"
                f"{hint}",
                field="scale",
            )

    def _along_axis(self, t: torch.Tensor, ndim: int) -> torch.Tensor:
        if not self.per_channel:
            return t
        shape = [1] * ndim
        shape[self.axis] = -1
        return t.reshape(shape)


def symmetric_zero_point(qdtype: QuantDType, quant_min: int, quant_max: int) -> int:
    """Where symmetric schemes put the zero point, as PyTorch's observers do.

    0 for signed types; for unsigned types the middle of the full range (128 for quint8), or
    ``(quant_min + quant_max) // 2`` when the range is narrowed.
    """
    if qdtype.qmin < 0:
        return 0
    if (quant_min, quant_max) == (qdtype.qmin, qdtype.qmax):
        return (qdtype.qmin + qdtype.qmax + 1) // 2
    return (quant_min + quant_max) // 2


def _integer(value: Any, name: str, where: str) -> int:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = value.item()
    try:
        if isinstance(value, bool):
            raise TypeError
        return operator.index(value)
    except TypeError:
        raise QParamsError(
            f"{where}: {name} must be an integer, got {value!r}", field=name
        ) from None


def _as_tensor(value: Any, dtype: torch.dtype, device: Any, name: str, where: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        t = value.detach()
    else:
        try:
            t = torch.tensor(value, dtype=torch.float64, device=device)
        except (TypeError, ValueError, RuntimeError):
            raise QParamsError(
                f"{where}: {name} must be a number or a list of numbers", field=name
            ) from None
    if not dtype.is_floating_point and t.is_floating_point():
        if not bool((t == t.round()).all()):
            raise QParamsError(f"{where}: {name} must hold integers, got {t.tolist()}", field=name)
        if bool((t.abs() > 2**62).any()):
            raise QParamsError(f"{where}: {name} is out of range, got {t.tolist()}", field=name)
    return t.to(device=t.device if device is None else device, dtype=dtype).clone()


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """Integer codes of a weight with the parameters that give them meaning.

    Stands in for PyTorch's quantized tensors and answers their accessors with PyTorch's names
    and types: ``int_repr()``, ``qscheme()``, ``q_scale()`` and ``q_zero_point()`` (per-tensor
    weights), ``q_per_channel_scales()``, ``q_per_channel_zero_points()`` and
    ``q_per_channel_axis()`` (per-channel weights), ``dequantize()``. As in PyTorch, asking a
    per-channel weight for its per-tensor parameters, or the reverse, raises RuntimeError.
    Symmetric schemes read as their affine counterparts, as PyTorch's quantized tensors do.

    ``codes`` is an ordinary int8, uint8 or int32 tensor (``int_repr()`` returns a copy of it).
    ``decomposed`` records which numerics path produced it, so :meth:`dequantize` gives exactly
    the values the module computes with. ``scale``, ``zero_point``, ``axis`` (None for
    per-tensor weights) and ``dtype`` (a name such as ``"qint8"``) read the parameters as refq
    stores them; ``qparams.qscheme`` is the qscheme's name.
    """

    codes: torch.Tensor
    qparams: WeightQParams
    decomposed: bool = False

    @property
    def scale(self) -> torch.Tensor:
        return self.qparams.scale

    @property
    def zero_point(self) -> torch.Tensor:
        return self.qparams.zero_point

    @property
    def axis(self) -> int | None:
        return self.qparams.axis if self.qparams.per_channel else None

    @property
    def dtype(self) -> str:
        return self.qparams.dtype

    def int_repr(self) -> torch.Tensor:
        """The integer codes, a new tensor as with PyTorch (``codes`` without the copy)."""
        return self.codes.clone()

    def qscheme(self) -> torch.qscheme:
        """``torch.per_tensor_affine`` or ``torch.per_channel_affine``."""
        return torch.per_channel_affine if self.qparams.per_channel else torch.per_tensor_affine

    def _expect(self, per_channel: bool, accessor: str) -> None:
        """RuntimeError, as PyTorch raises, for an accessor of the other kind of scheme."""
        if self.qparams.per_channel == per_channel:
            return
        if per_channel:
            needs, use = "per-channel", "q_scale() and q_zero_point()"
        else:
            needs = "per-tensor"
            use = "q_per_channel_scales(), q_per_channel_zero_points() and q_per_channel_axis()"
        raise RuntimeError(
            f"{accessor}() needs a {needs} quantized weight, this one is "
            f"{self.qparams.qscheme}: use {use}"
        )

    def q_scale(self) -> float:
        """The scale of a per-tensor weight, as a Python float."""
        self._expect(False, "q_scale")
        return float(self.qparams.scale.item())

    def q_zero_point(self) -> int:
        """The zero point of a per-tensor weight, as a Python int."""
        self._expect(False, "q_zero_point")
        return int(self.qparams.zero_point.item())

    def q_per_channel_scales(self) -> torch.Tensor:
        """The scales of a per-channel weight, float64 as in PyTorch."""
        self._expect(True, "q_per_channel_scales")
        return self.qparams.scale.to(torch.float64, copy=True)

    def q_per_channel_zero_points(self) -> torch.Tensor:
        """The zero points of a per-channel weight, int64 as in PyTorch."""
        self._expect(True, "q_per_channel_zero_points")
        return self.qparams.zero_point.to(torch.int64, copy=True)

    def q_per_channel_axis(self) -> int:
        """The channel axis of a per-channel weight, non-negative as in PyTorch."""
        self._expect(True, "q_per_channel_axis")
        return self.qparams.axis % max(1, self.codes.dim())

    def dequantize(self) -> torch.Tensor:
        """Float32 values of the codes, exactly those the module computes with."""
        return dequantize(self.codes, self.qparams, decomposed=self.decomposed)


def _fma_f32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``f32(a * b + c)`` with a single rounding, as a fused multiply-add gives it.

    ``a * b`` of two float32 values is exact in float64. Adding ``c`` in float64 may round, and
    rounding that result again to float32 goes wrong exactly when the float64 sum lands on a
    float32 midpoint; the sign of the float64 sum's error (TwoSum) then breaks the tie.
    """
    p = a.double() * b.double()
    c = c.double()
    s = p + c
    s_minus_p = s - p
    err = (p - (s - s_minus_p)) + (c - s_minus_p)
    f = s.float()
    d = s - f.double()
    other = f.double() + 2 * d
    midpoint = (d != 0) & (other.float().double() == other)
    g = other.float()
    toward_err = torch.where(err > 0, torch.maximum(f, g), torch.minimum(f, g))
    return torch.where(midpoint & (err != 0), toward_err, f)


# Quantization runs block by block of rows, about a megabyte of float32 at a time, so that its
# several elementwise steps work on data in the CPU cache and allocate nothing weight-sized.
BLOCK_ELEMENTS = 1 << 18


def _row_blocks(w: torch.Tensor) -> Iterator[Any]:
    """Index expressions that cover ``w``: slices of whole rows along dim 0 (all of it at once
    on a GPU, where one big kernel beats many small ones)."""
    if w.dim() == 0:
        yield ...
        return
    rows = w.shape[0]
    step = max(1, rows if w.is_cuda else BLOCK_ELEMENTS // max(1, math.prod(w.shape[1:])))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


def _for_rows(qp: WeightQParams, t: torch.Tensor, ndim: int, rows: Any) -> torch.Tensor:
    """Scale or zero point ``t`` shaped to broadcast against ``w[rows]``."""
    if not qp.per_channel:
        return t
    t = qp._along_axis(t, ndim)
    return t[rows] if qp.axis % ndim == 0 else t


def _rounded(
    w: torch.Tensor,
    s: torch.Tensor,
    z: torch.Tensor,
    qp: WeightQParams,
    decomposed: bool,
    out: torch.Tensor | None,
) -> torch.Tensor:
    """Codes before clamping, as floats, following the path table in the module docstring;
    in ``out`` (float32, ``w``'s shape) where the path computes in float32."""
    if decomposed:
        inv = (1.0 / s.double()).float() if not qp.per_channel else torch.reciprocal(s)
        return torch.mul(w, inv, out=out).round_().add_(z)
    if w.is_cuda:
        return torch.round(w.double() / s.double()).add_(z)
    inv = torch.reciprocal(s)
    if not qp.per_channel and qp.dtype != "qint32":
        return torch.round(_fma_f32(w, inv, z), out=out)
    return torch.mul(w, inv, out=out).add_(z).round_()


def _codes(r: torch.Tensor, qp: WeightQParams, out: torch.Tensor | None) -> torch.Tensor:
    """Clamped integer codes of rounded ``r``, in ``out`` where they fit 8 bits. NaN becomes
    code 0, so that the values stay the codes' values (casting NaN is undefined in C++: on
    x86, PyTorch's per-channel and decomposed 8-bit kernels give 0, others other codes)."""
    r.nan_to_num_(nan=0.0).clamp_(qp.quant_min, qp.quant_max)
    if qp.storage != torch.int32:  # whole numbers within 8 bits: the cast is exact
        return out.copy_(r)
    # float32 cannot hold 2**31 - 1: clamp again once the codes are integers
    return r.long().clamp_(qp.quant_min, qp.quant_max).to(qp.storage)


def fake_quantized_rows(
    block: torch.Tensor,
    s: torch.Tensor,
    z: torch.Tensor | None,
    qp: WeightQParams,
    out: torch.Tensor,
) -> torch.Tensor:
    """:func:`fake_quantize`'s values of ``block`` (finite float32 rows of a per-channel
    weight on the CPU; ``s`` and ``z`` shaped to broadcast against them, ``z`` None where
    every zero point is 0), computed in ``out`` by the same path with no codes stored, for a
    search that tries many quantization parameters: the same numbers as :func:`_rounded`,
    :func:`_codes` and :func:`_values` give, but that a zero may come out as -0.0 (which
    ``tests/test_observers.py`` holds the mse search to). 8-bit codes only."""
    assert qp.per_channel and qp.storage != torch.int32 and not block.is_cuda
    v = torch.mul(block, torch.reciprocal(s), out=out)  # _rounded's per-channel CPU path
    if z is not None:
        v.add_(z)
    v.round_().clamp_(qp.quant_min, qp.quant_max)  # finite: no NaN to make 0
    return (v if z is None else v.sub_(z)).mul_(s)


def _values(
    q: torch.Tensor,
    s: torch.Tensor,
    z: torch.Tensor,
    qp: WeightQParams,
    decomposed: bool,
    rounded: torch.Tensor | None = None,
) -> torch.Tensor:
    """Float32 values of codes ``q``. ``rounded``, the clamped codes as float32 when at hand,
    is reused in place of converting ``q`` back: for 8-bit codes it holds them exactly (but
    for the sign of zero, which adding 0.0 clears), and ``q - z`` is then exact in either
    formula of the module docstring."""
    if rounded is not None and rounded.dtype == torch.float32 and qp.storage != torch.int32:
        return rounded.add_(0.0).sub_(z).mul_(s)
    float_subtract = (
        qp.per_channel if q.device.type == "cpu" and not decomposed else not qp.per_channel
    )
    if float_subtract:
        return (q.float() - z.float()).mul_(s)
    return (q.long() - z.long()).float().mul_(s)


def quantize_blocks(
    w: torch.Tensor, qp: WeightQParams, *, decomposed: bool = False, values: bool = True
) -> Iterator[tuple[Any, torch.Tensor, torch.Tensor | None]]:
    """``(rows, codes, values)`` for consecutive blocks of ``w``'s rows: the integer codes of
    ``w[rows]`` and, with ``values``, their float32 values. Every quantization in refq runs
    through here; callers consume each block while it is in the cache.

    The yielded tensors live in buffers that the next block reuses (fresh memory costs a page
    fault every 4 kB): copy what you keep.
    """
    qp.check_weight(w)
    w = w.detach()  # no autograd graph; no_grad here would leak to the caller between yields
    buffers: list[torch.Tensor | None] | None = None
    for rows in _row_blocks(w):
        block = w[rows].float()
        if buffers is None:  # sized by the first block, the largest; only those a path uses
            n = block.numel()
            buffers = [
                None if w.is_cuda and not decomposed else torch.empty(n, device=w.device),
                None
                if qp.storage == torch.int32
                else torch.empty(n, dtype=qp.storage, device=w.device),
            ]
        float_buffer, code_buffer = (
            None if b is None else b[: block.numel()].view(block.shape) for b in buffers
        )
        s = _for_rows(qp, qp.scale, w.dim(), rows)
        z = _for_rows(qp, qp.zero_point, w.dim(), rows)
        rounded = _rounded(block, s, z, qp, decomposed, float_buffer)
        q = _codes(rounded, qp, code_buffer)
        yield rows, q, _values(q, s, z, qp, decomposed, rounded) if values else None


def quantize(w: torch.Tensor, qp: WeightQParams, *, decomposed: bool = False) -> torch.Tensor:
    """Integer codes of ``w`` in ``qp``'s storage dtype (int8, uint8 or int32)."""
    codes = torch.empty(w.shape, dtype=qp.storage, device=w.device)
    for rows, q, _ in quantize_blocks(w, qp, decomposed=decomposed, values=False):
        codes[rows] = q
    return codes


def dequantize(q: torch.Tensor, qp: WeightQParams, *, decomposed: bool = False) -> torch.Tensor:
    """Float32 values of integer codes ``q``."""
    s = qp._along_axis(qp.scale, q.dim())
    z = qp._along_axis(qp.zero_point, q.dim())
    return _values(q, s, z, qp, decomposed)


def row_sums_of_squares(
    rows: torch.Tensor, *, in_place: bool = False, as_rows: int | None = None
) -> torch.Tensor:
    """The sum of squares of each row of a 2-D tensor (as float64), whatever the thread count.

    torch's reductions (``sum``, ``dot``) split their work by the number of threads, and so
    does the order in which they add: their last digits change with ``OMP_NUM_THREADS``. Here
    the squares are added pairwise by in-place elementwise operations, each element on its
    own: column ``j`` gets column ``j + half``, then the first half is folded again; the last
    few hundred values are added exactly (``math.fsum``). The order depends on the shape
    alone, and the relative error is about ``log2(n)`` roundings of the working dtype, at
    worst: float64 by default (where the squares of float32 values are exact). With
    ``in_place``, ``rows`` is the scratch space and its dtype the working one: a reused
    float32 buffer is twice as fast, and still far more accurate than a float32 dot product
    (over a block of 262k values: a few 1e-9 against about 1e-6). ``as_rows``: sum as for a
    tensor of that many rows, of which ``rows`` is a part (the same sums, block by block).
    """
    acc = rows if in_place else rows.detach().to(torch.float64, copy=True)
    n = acc.shape[1]
    half = (n + 1) // 2
    acc[:, :half].mul_(acc[:, :half])  # the first fold squares as it goes
    acc[:, : n - half].addcmul_(acc[:, half:n], acc[:, half:n])
    return _folded_sums(acc, half, as_rows)


def row_sums(rows: torch.Tensor, *, in_place: bool = False) -> torch.Tensor:
    """The sum of each row of a 2-D tensor (as float64), whatever the thread count: added in
    the order :func:`row_sums_of_squares` adds its squares."""
    acc = rows if in_place else rows.detach().to(torch.float64, copy=True)
    return _folded_sums(acc, acc.shape[1])


def _folded_sums(acc: torch.Tensor, n: int, as_rows: int | None = None) -> torch.Tensor:
    """The sums of the first ``n`` columns of each row of ``acc``, folded in place (the tail
    left as for ``as_rows`` rows)."""
    rows = acc.shape[0] if as_rows is None else as_rows
    while n > 1 and rows * n > _EXACT_TAIL:
        half = (n + 1) // 2
        acc[:, : n - half].add_(acc[:, half:n])  # disjoint halves, no slice assignment
        n = half
    if n == 1:
        return acc[:, 0].clone()
    sums = [math.fsum(row) for row in acc[:, :n].tolist()]
    return torch.tensor(sums, dtype=torch.float64, device=acc.device)


_EXACT_TAIL = 512  # values left when row_sums_of_squares stops folding and adds exactly


def fake_quantize(w: torch.Tensor, qp: WeightQParams, *, decomposed: bool = False) -> torch.Tensor:
    """``dequantize(quantize(w))`` in ``w``'s dtype: the values a reference module computes with."""
    return quantize_with_values(w, qp, decomposed=decomposed)[1]


def quantize_with_values(
    w: torch.Tensor, qp: WeightQParams, *, decomposed: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(quantize(w), fake_quantize(w))`` in one pass over ``w``."""
    codes = torch.empty(w.shape, dtype=qp.storage, device=w.device)
    values = torch.empty_like(w, memory_format=torch.contiguous_format)
    for rows, q, v in quantize_blocks(w, qp, decomposed=decomposed):
        codes[rows] = q
        values[rows] = v
    return codes, values


# Beyond this, q - z of 32-bit codes is not exact in float32, and PyTorch's dequantize ops do not
# all round it the same way (see the module docstring).
EXACT_FLOAT_CODES = 2**24


def traceable_dequantize(weight: QuantizedWeight) -> torch.Tensor:
    """Float32 values of ``weight``'s codes through PyTorch's ``quantized_decomposed``
    dequantize ops: what ``torch.export`` and ``torch.jit.trace`` record, and PyTorch's ONNX
    exporter lowers to ``DequantizeLinear``. A per-tensor weight's scale and zero point become
    numbers in the graph. The values equal :func:`dequantize`'s whenever ``|q|`` and ``|z|``
    are at most :data:`EXACT_FLOAT_CODES` (always, for 8-bit and 4-bit codes)."""
    ops, qp = _decomposed_ops(), weight.qparams
    bounds = (qp.quant_min, qp.quant_max, qp.storage)
    if qp.per_channel:
        return ops.dequantize_per_channel(weight.codes, qp.scale, qp.zero_point, qp.axis, *bounds)
    scale, zero_point = float(qp.scale), int(qp.zero_point)
    return ops.dequantize_per_tensor(weight.codes, scale, zero_point, *bounds)


def _decomposed_ops() -> Any:
    """``torch.ops.quantized_decomposed``; ExportError when this PyTorch has none."""
    ops = torch.ops.quantized_decomposed
    if not hasattr(ops, "dequantize_per_channel"):
        raise ExportError(
            f"PyTorch {torch.__version__} has no quantized_decomposed dequantize ops, which "
            "tracing refq's modules records; use PyTorch 2.4 or later"
        )
    return ops


# PyTorch registers the ops (and its ONNX exporter, when it first runs, their translations)
# when this module is imported: before any refq module is traced or exported.
with contextlib.suppress(ImportError):
    importlib.import_module("torch.ao.quantization.fx._decomposed")
