"""The converter registry: float module type -> function building its reference module.

Built-ins cover the six recurrent types. Third-party packages add converters through the
entry-point group ``refq.converters``: each entry point names a module (importing it runs its
``@register`` decorators) or a callable taking no arguments that registers its converters.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from importlib.metadata import entry_points
from typing import Any

from torch import nn

from refq_cli import reference
from refq_cli.errors import RefqError

Converter = Callable[[nn.Module, Mapping[str, Any]], nn.Module]
ENTRY_POINT_GROUP = "refq.converters"

_CONVERTERS: dict[type[nn.Module], Converter] = {}
_entry_points_loaded = False


class RegistryError(RefqError):
    """A converter lookup or registration that failed."""


def register(
    float_type: type[nn.Module], *, replace: bool = False
) -> Callable[[Converter], Converter]:
    """Decorator: ``@register(nn.LSTM)`` makes the function the converter for that type."""

    def add(converter: Converter) -> Converter:
        if float_type in _CONVERTERS and not replace:
            raise RegistryError(
                f"a converter for {describe(float_type)} is already registered "
                f"({describe(_CONVERTERS[float_type])}); pass replace=True to override it"
            )
        _CONVERTERS[float_type] = converter
        return converter

    return add


def converters() -> dict[type[nn.Module], Converter]:
    """Every registered converter, entry points included."""
    _load_entry_points()
    return dict(_CONVERTERS)


def converter_for(module: nn.Module) -> Converter:
    """The converter for ``module``'s type (or its nearest registered base class)."""
    table = converters()
    for cls in type(module).__mro__:
        if cls in table:
            return table[cls]
    known = ", ".join(sorted(describe(t) for t in table))
    raise RegistryError(
        f"no converter for {describe(type(module))}; registered: {known}. Third-party converters "
        f"register through the '{ENTRY_POINT_GROUP}' entry-point group"
    )


def describe(obj: Any) -> str:
    """``module.Qualified.name`` of a type or function; a classmethod is named by its class."""
    owner = getattr(obj, "__self__", None)
    if isinstance(owner, type):
        return f"{owner.__module__}.{owner.__qualname__}.{obj.__name__}"
    return f"{obj.__module__}.{obj.__qualname__}"


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = ep.load()
            if callable(loaded) and not isinstance(loaded, type):
                loaded()
        except Exception as exc:
            raise RegistryError(
                f"entry point {ep.name!r} ({ep.value}) in group '{ENTRY_POINT_GROUP}' failed "
                f"to load: {exc}"
            ) from exc


for _float_type, _reference_type in reference.REFERENCE_TYPES.items():
    register(_float_type)(_reference_type.from_float)
