"""Weight quantization state shared by every reference module.

Each quantized weight ``W`` of a module keeps PyTorch's layout: the float weight stays a
parameter, and its quantization parameters live in buffers named ``W_scale``, ``W_zero_point``
and ``W_axis`` (so they travel with ``state_dict`` and ``.to()``, and in-place edits take effect),
with ``W_qscheme``, ``W_dtype``, ``W_quant_min`` and ``W_quant_max`` as plain attributes.

The fake-quantized weights are computed once, with their integer codes, and reused until a
weight or a quantization parameter changes: replaced, moved, or modified in place (PyTorch bumps
a tensor's version counter on every in-place write, except writes through ``.data``; call
``invalidate_cache()`` after those).

Under ``torch.export`` (and so ``torch.onnx.export``) and ``torch.jit.trace`` a module computes
with its cached integer codes, recorded as integer constants, through PyTorch's
``quantized_decomposed`` dequantize ops: the graph holds the integers, whatever ran before. The
codes are there from the start for a module built from an artifact, by ``from_float`` or by its
constructor; tracing a module whose weights changed since (and that has not run since) raises
ExportError naming ``refresh_cache()``.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from refq_cli.errors import ExportError, QParamsError, did_you_mean
from refq_cli.kinds import KINDS
from refq_cli.quant.numerics import (
    EXACT_FLOAT_CODES,
    QuantizedWeight,
    WeightQParams,
    canonical_name,
    dequantize,
    fake_quantize,
    quantize_with_values,
    traceable_dequantize,
)

# PyTorch's reference modules quantize every weight this way when given no weight_qparams_dict.
_TORCH_DEFAULT_QPARAMS = {
    "qscheme": "per_tensor_affine",
    "dtype": "quint8",
    "scale": 1.0,
    "zero_point": 0,
}
_QPARAM_BUFFERS = ("_scale", "_zero_point", "_axis")
_SKIP_INIT: contextvars.ContextVar[bool] = contextvars.ContextVar("refq_skip_init", default=False)
# Set while refq builds modules whose cache it fills itself (use_quantized) or never needs.
_DEFER_CACHE: contextvars.ContextVar[bool] = contextvars.ContextVar("refq_defer", default=False)


@contextlib.contextmanager
def deferred_cache() -> Iterator[None]:
    """Modules built inside leave their cache empty (until a forward or :meth:`use_quantized`)
    instead of filling it in their constructor or ``from_float``."""
    token = _DEFER_CACHE.set(True)
    try:
        yield
    finally:
        _DEFER_CACHE.reset(token)


_QPARAM_ATTRIBUTES = ("_qscheme", "_dtype", "_quant_min", "_quant_max")


class QuantizedWeightsMixin:
    """Registers per-weight quantization parameters and serves cached fake-quantized weights.

    Mixed into ``nn.Module`` subclasses, which call :meth:`_init_weight_qparams` once their
    float parameters exist and compute with the tensors :meth:`_computation_weights` returns.
    """

    _FLOAT_TYPE: ClassVar[type[nn.Module]]  # the float module type this class stands for
    _NAME: ClassVar[str]  # what _get_name() returns, as PyTorch's reference modules name it
    is_decomposed: bool
    _quantized_names: tuple[str, ...]

    def _get_name(self) -> str:
        return self._NAME

    def reset_parameters(self) -> None:
        if not _SKIP_INIT.get():
            super().reset_parameters()  # type: ignore[misc]

    @classmethod
    def _config_of(cls, mod: nn.Module) -> dict[str, Any]:
        """Constructor arguments that rebuild ``mod``'s structure: its kind's
        (:data:`refq_cli.kinds.KINDS`), for the torch.nn type this class stands for."""
        kind = next(KINDS[t.__name__] for t in cls._FLOAT_TYPE.__mro__ if t.__name__ in KINDS)
        return {name: getattr(mod, name) for name in kind.arguments}

    @classmethod
    def from_float(
        cls,
        mod: nn.Module,
        weight_qparams_dict: Mapping[str, Any] | None,
        use_precomputed_fake_quant: bool = False,
    ) -> Any:
        """A reference module sharing ``mod``'s parameters, quantized as the dict says.

        ``use_precomputed_fake_quant`` is accepted for compatibility with PyTorch and ignored.
        """
        if not isinstance(mod, cls._FLOAT_TYPE):
            raise QParamsError(
                f"{cls.__name__}.from_float expects torch.nn.{cls._FLOAT_TYPE.__name__}, "
                f"got {type(mod).__name__}"
            )
        first = next(mod.parameters())
        token = _SKIP_INIT.set(True)  # the parameters are replaced below: skip their random init
        try:
            ref = cls(
                **cls._config_of(mod),
                device=first.device,
                dtype=first.dtype,
                weight_qparams_dict=weight_qparams_dict,
            )
        finally:
            _SKIP_INIT.reset(token)
        for name in ref._computation_names():
            setattr(ref, name, getattr(mod, name))
        if not _DEFER_CACHE.get():
            ref.refresh_cache()
        return ref

    def _init_weight_qparams(
        self,
        weight_names: Sequence[str],
        weight_qparams_dict: Mapping[str, Any] | None,
        device: torch.device | str | None,
    ) -> None:
        if weight_qparams_dict is None:
            weight_qparams_dict = dict.fromkeys(weight_names, _TORCH_DEFAULT_QPARAMS)
        if not isinstance(weight_qparams_dict, Mapping):
            raise QParamsError(
                f"{self._get_name()}: weight_qparams_dict must be a dict, "
                f"got {type(weight_qparams_dict).__name__}"
            )
        entries = {k: v for k, v in weight_qparams_dict.items() if k != "is_decomposed"}
        _check_keys(self._get_name(), entries, weight_names)
        is_decomposed = weight_qparams_dict.get("is_decomposed", False)
        if not isinstance(is_decomposed, bool):
            raise QParamsError(
                f"{self._get_name()}: is_decomposed must be true or false, got {is_decomposed!r}"
            )
        self.is_decomposed = is_decomposed

        quantized = []
        for name in weight_names:
            entry = entries[name]
            where = f"{self._get_name()}.{name}"
            if isinstance(entry, WeightQParams):
                qparams: WeightQParams | None = entry
            elif not isinstance(entry, Mapping):
                raise QParamsError(f"{where}: expected a dict of quantization parameters")
            elif "qscheme" in entry and canonical_name(entry["qscheme"]) == "none":
                qparams = None
            else:
                qparams = WeightQParams.from_mapping(entry, device=device, where=where)
            if qparams is None:
                setattr(self, name + "_qscheme", "none")
                continue
            qparams.check_weight(getattr(self, name), where)
            self._set_qparams(name, qparams)
            quantized.append(name)
        self._quantized_names = tuple(quantized)
        self.invalidate_cache()
        if not (_SKIP_INIT.get() or _DEFER_CACHE.get()):
            self.refresh_cache()

    def _set_qparams(self, name: str, qp: WeightQParams) -> None:
        self.register_buffer(name + "_scale", qp.scale)
        self.register_buffer(name + "_zero_point", qp.zero_point)
        self.register_buffer(
            name + "_axis", torch.tensor(qp.axis, dtype=torch.int32, device=qp.scale.device)
        )
        setattr(self, name + "_qscheme", qp.qscheme)
        setattr(self, name + "_dtype", qp.dtype)
        setattr(self, name + "_quant_min", qp.quant_min)
        setattr(self, name + "_quant_max", qp.quant_max)
        setattr(self, name + "_axis_int", qp.axis)

    def weight_qparams(self, name: str, *, validate: bool = True) -> WeightQParams | None:
        """The current quantization parameters of ``name``; None for biases and float weights.

        Read from the buffers and attributes, so edits to them take effect. ``validate=False``
        skips the checks (which read tensor values), for tracing and compilation.
        """
        if name not in self._quantized_names:
            if name in self._computation_names():
                return None
            raise QParamsError(f"{self._get_name()} has no weight {name!r}")
        fields = {
            "qscheme": getattr(self, name + "_qscheme"),
            "dtype": getattr(self, name + "_dtype"),
            "scale": getattr(self, name + "_scale"),
            "zero_point": getattr(self, name + "_zero_point"),
            "quant_min": getattr(self, name + "_quant_min"),
            "quant_max": getattr(self, name + "_quant_max"),
        }
        if not validate:
            return WeightQParams(axis=getattr(self, name + "_axis_int"), **fields)
        where = f"{self._get_name()}.{name}"
        qparams = WeightQParams.create(**fields, axis=getattr(self, name + "_axis"), where=where)
        qparams.check_weight(getattr(self, name), where)
        setattr(self, name + "_axis_int", qparams.axis)
        return qparams

    def get_weight(self, name: str) -> torch.Tensor | None:
        """Weight ``name`` as the module computes with it: fake-quantized, or float if kept so."""
        return self._computation_weights()[self._computation_names().index(name)]

    def get_quantized_weight(self, name: str) -> QuantizedWeight | torch.Tensor | None:
        """Integer codes and parameters of weight ``name``; the float tensor if it stays float."""
        weight = getattr(self, name, None)
        qp = self.weight_qparams(name)
        if weight is None or qp is None:
            return weight
        self._computation_weights()
        cached = self._codes.get(name)
        if cached is None:  # cached values given without their codes
            codes = quantize_with_values(weight, qp, decomposed=self.is_decomposed)[0]
        else:
            codes = cached.codes.clone()
        return QuantizedWeight(codes, qp, self.is_decomposed)

    def invalidate_cache(self) -> None:
        """Forget the cached fake-quantized weights; the next forward recomputes them."""
        self._cache_key: tuple = ()
        self._cache: list[torch.Tensor | None] = []
        self._codes: dict[str, QuantizedWeight] = {}
        self._cache_sources: list[torch.Tensor | None] = []
        self._cache_pins: list[torch.Tensor] = []

    def refresh_cache(self) -> None:
        """Bring the cached fake-quantized weights and integer codes up to date with the weights
        now (a forward does it too): call it before exporting a module whose weights changed
        since it last ran."""
        self._computation_weights()

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)  # type: ignore[misc]
        # A tensor put in place of a weight or a parameter: tracing cannot see the change.
        if isinstance(value, torch.Tensor) and self.__dict__.get("_cache_key"):
            self.invalidate_cache()

    def __getstate__(self) -> dict[str, Any]:
        # Pickling a module (torch.save of a whole model) stores its parameters, not the cache.
        state = dict(super().__getstate__())  # type: ignore[misc]
        state["_cache_key"], state["_cache"], state["_codes"] = (), [], {}
        state["_cache_sources"], state["_cache_pins"] = [], []
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Unpickled or deep-copied: the codes are back at once, ready to be traced.
        super().__setstate__(state)  # type: ignore[misc]
        self._refill()

    def _computation_names(self) -> Sequence[str]:
        """Names of the tensors the forward computation takes, in its order."""
        raise NotImplementedError

    def _computation_weights(
        self, known: Mapping[str, tuple[torch.Tensor | None, torch.Tensor]] | None = None
    ) -> list[torch.Tensor | None]:
        """The tensors named by ``_computation_names``, quantized weights fake-quantized.

        Checking the cache costs one pass over the module's tensors: the key records each
        tensor's id, version counter and data pointer, plus the plain quantization attributes.
        While a key is cached, the tensors it names and their storages are pinned, so neither an
        id nor an address in it can be reused by another tensor. ``known`` weights (codes, or
        None, and fake-quantized values) are taken as they are when the cache is filled.
        """
        names = self._computation_names()
        if torch.compiler.is_exporting() or torch.jit.is_tracing():
            return self._traced_weights(names)
        if torch.compiler.is_compiling():
            # Compiled code cannot key a cache on tensor identity; quantize inline, as PyTorch does.
            return [self._fake_quantized(n) for n in names]
        params, buffers = self._parameters, self._buffers
        # Parametrized or plain-tensor weights live outside _parameters; getattr returns a new
        # tensor for a parametrized one on every call, so the cache then always refreshes.
        tensors = [params[n] if n in params else getattr(self, n, None) for n in names]
        tensors += [buffers[n + s] for n in self._quantized_names for s in _QPARAM_BUFFERS]
        key = self._key(tensors)
        if key != self._cache_key or known:
            known = known or {}
            codes: dict[str, QuantizedWeight] = {}
            values: list[torch.Tensor | None] = []
            with torch.no_grad():
                for n in names:
                    weight, v = self._quantized(n, known.get(n))
                    if weight is not None and _traceable(weight):
                        codes[n] = weight
                    values.append(v)
                self._cache = self._arrange_for_kernels(values)
            self._codes = codes
            self._cache_sources = tensors
            self._cache_pins = [t.detach() for t in tensors if t is not None]
            self._cache_key = key
        return self._cache

    def _key(self, tensors: Sequence[torch.Tensor | None]) -> tuple:
        """What the cache is valid for: the tensors' identities and versions, the attributes."""
        key: list[Any] = [torch.is_inference_mode_enabled(), self.is_decomposed]
        for t in tensors:
            key += (None,) if t is None else (id(t), t._version, t.data_ptr())
        for name in self._quantized_names:
            key += (getattr(self, name + a) for a in _QPARAM_ATTRIBUTES)
        return tuple(key)

    def _traced_weights(self, names: Sequence[str]) -> list[torch.Tensor | None]:
        """The computation tensors as a trace records them: each quantized weight its cached
        codes (a constant) through a dequantize op, with the scale and zero point buffers."""
        key = self._key(self._cache_sources)
        if not self._cache_key or key[1:] != self._cache_key[1:]:  # inference mode (0) aside
            raise ExportError(
                f"{self._get_name()}: its weights changed since its integer codes were "
                "computed; call refresh_cache() on it (or run it once) before exporting"
            )
        out = []
        for n in names:
            tensor = getattr(self, n, None)
            if tensor is None or n not in self._quantized_names:
                out.append(tensor)
                continue
            cached = self._codes.get(n)
            if cached is None:
                why = (
                    f"its codes or zero points exceed {EXACT_FLOAT_CODES} in size, beyond "
                    "which PyTorch's dequantize ops round differently from the module"
                    if getattr(self, n + "_dtype") == "qint32"
                    else "its integer codes are not cached: call refresh_cache() on the module"
                )
                raise ExportError(f"{self._get_name()}.{n}: cannot be traced: {why}")
            out.append(traceable_dequantize(cached).to(tensor.dtype))
        return out

    def _arrange_for_kernels(self, tensors: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """The cached tensors laid out as the kernels read them best; as they are by default."""
        return tensors

    def use_quantized(
        self, weights: Mapping[str, tuple[torch.Tensor | None, torch.Tensor]]
    ) -> None:
        """Cache weights quantized elsewhere, saving their recomputation: per name, the integer
        codes (None if not at hand) and fake-quantized values.

        They must be what this module computes itself, ``fake_quantize(w, weight_qparams(n))``
        with its ``is_decomposed``: the converter passes the dequantized codes it writes.
        """
        self._computation_weights(known=weights)

    def set_quantized_weights(self, codes: Mapping[str, torch.Tensor]) -> None:
        """Make these integer codes the weights: each weight becomes its codes' values (in the
        module's dtype), and the codes are cached as they are. What loading an artifact does,
        and converting with codes chosen elsewhere (GPTQ's)."""
        known = {}
        for name, q in codes.items():
            qp = self.weight_qparams(name)
            assert qp is not None, name
            dtype = getattr(self, name).dtype
            value = dequantize(q, qp, decomposed=self.is_decomposed).to(dtype)
            setattr(
                self, name, nn.Parameter(value, requires_grad=getattr(self, name).requires_grad)
            )
            known[name] = (q, getattr(self, name).detach())
        self.use_quantized(known)

    def _quantized(
        self, name: str, known: tuple[torch.Tensor | None, torch.Tensor] | None
    ) -> tuple[QuantizedWeight | None, torch.Tensor | None]:
        """The codes (None if it stays float, or ``known`` has none) and fake-quantized values
        of ``name``: ``known`` ones as they are, else computed."""
        tensor = getattr(self, name, None)
        if tensor is None or name not in self._quantized_names:
            return None, tensor
        qparams = self.weight_qparams(name)
        if known is not None:
            codes, values = known
        else:
            codes, values = quantize_with_values(tensor, qparams, decomposed=self.is_decomposed)
        if codes is None:
            return None, values
        return QuantizedWeight(codes, qparams, self.is_decomposed), values

    def _fake_quantized(self, name: str) -> torch.Tensor | None:
        tensor = getattr(self, name, None)
        if tensor is None or name not in self._quantized_names:
            return tensor
        qparams = self.weight_qparams(name, validate=False)
        return fake_quantize(tensor, qparams, decomposed=self.is_decomposed)

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        # .to(), .cuda(), .double() and friends: drop the cache so the old copies are freed now,
        # and fill it again if it was (its codes are what tracing records).
        filled = bool(self.__dict__.get("_cache_key"))
        self.invalidate_cache()
        applied = super()._apply(fn, recurse)  # type: ignore[misc]
        if filled:
            self._refill()
        return applied

    def _refill(self) -> None:
        """Fill the cache now, unless the tensors hold no data (on the meta device)."""
        if not any(p.is_meta for p in self.parameters(recurse=False)):
            self.refresh_cache()


def _traceable(weight: QuantizedWeight) -> bool:
    """Whether tracing's dequantize ops give exactly the module's values for ``weight``: its
    codes and zero points at most :data:`EXACT_FLOAT_CODES` in size (8 and 4 bits always)."""
    if weight.qparams.storage != torch.int32:
        return True
    return all(
        t.numel() == 0 or int(t.abs().max()) <= EXACT_FLOAT_CODES
        for t in (weight.codes, weight.zero_point)
    )


def _check_keys(owner: str, entries: Mapping[str, Any], weight_names: Sequence[str]) -> None:
    unknown = [k for k in entries if k not in weight_names]
    if unknown:
        hint = did_you_mean(str(unknown[0]), weight_names, aside=True)
        raise QParamsError(
            f"{owner}: weight_qparams_dict has unknown weight {unknown[0]!r}{hint}; "
            f"this module's weights are {', '.join(weight_names)}"
        )
    missing = [n for n in weight_names if n not in entries]
    if missing:
        raise QParamsError(
            f"{owner}: weight_qparams_dict is missing {', '.join(missing)}; give every weight "
            "its parameters, or qscheme None to keep it float"
        )
