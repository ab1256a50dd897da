"""The converter registry: float module type -> function building its reference module, and
the reference type an artifact records -> the class that rebuilds it (its reader).

Built-ins cover the six recurrent types. Third-party packages add converters through the
entry-point group ``refq.converters``: each entry point names a module (importing it runs its
``@register`` decorators) or a callable taking no arguments that registers its converters.

Writing and reading go through this one table: a converter that is a reference class's
``from_float`` also registers that class as the reader of the modules it builds, which
artifacts name by ``_get_name()`` (``reference_type``). ``load_artifact`` rebuilds each module
with the reader registered for that name, and nothing else: a name no registered class reads
is an error, never a silent stand-in.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from importlib.metadata import entry_points
from typing import Any

from torch import nn

from refq_cli import reference
from refq_cli.errors import RefqError
from refq_cli.reference._weights import QuantizedWeightsMixin

Converter = Callable[[nn.Module, Mapping[str, Any]], nn.Module]
ENTRY_POINT_GROUP = "refq.converters"

_CONVERTERS: dict[type[nn.Module], Converter] = {}
_READERS: dict[str, type[nn.Module]] = {}  # reference type as artifacts record it -> its class
_entry_points_loaded = False


class RegistryError(RefqError):
    """A converter lookup or registration that failed."""


def register(
    float_type: type[nn.Module],
    *,
    replace: bool = False,
    reader: type[nn.Module] | None = None,
) -> Callable[[Converter], Converter]:
    """Decorator: ``@register(nn.LSTM)`` makes the function the converter for that type.

    The class that reads back the modules it builds is ``reader``, or the class whose
    ``from_float`` the converter is. A reader is a subclass of one of
    :mod:`refq_cli.reference`'s modules (it is rebuilt from the artifact as they are); a name
    another class reads already is refused unless ``replace``.
    """

    def add(converter: Converter) -> Converter:
        if float_type in _CONVERTERS and not replace:
            raise RegistryError(
                f"a converter for {describe(float_type)} is already registered "
                f"({describe(_CONVERTERS[float_type])}); pass replace=True to override it"
            )
        cls = reader or _class_of(converter)
        if cls is not None:
            _add_reader(cls, replace)
        _CONVERTERS[float_type] = converter
        return converter

    return add


def _class_of(converter: Converter) -> type[nn.Module] | None:
    """The reference class whose ``from_float`` classmethod ``converter`` is, if it is one."""
    owner = getattr(converter, "__self__", None)
    return owner if isinstance(owner, type) and issubclass(owner, QuantizedWeightsMixin) else None


def _add_reader(cls: type[nn.Module], replace: bool) -> None:
    if not (isinstance(cls, type) and issubclass(cls, QuantizedWeightsMixin)):
        raise RegistryError(
            f"reader {describe(cls)} is no subclass of refq's reference modules "
            "(refq_cli.reference), which artifacts are read back into"
        )
    name = reference_name(cls)
    if _READERS.get(name, cls) is not cls and not replace:
        raise RegistryError(
            f"{describe(_READERS[name])} already reads modules named {name!r}; give "
            f"{describe(cls)} a name of its own (_NAME) or pass replace=True"
        )
    _READERS[name] = cls


def reference_name(cls: type[nn.Module]) -> str:
    """The name modules of a reference class record in artifacts: their ``_get_name()``."""
    return cls._NAME  # type: ignore[attr-defined]


def reader_for(reference_type: str | None, float_type: str) -> type[nn.Module]:
    """The registered class that rebuilds a module an artifact records as ``reference_type``
    (converted from a ``float_type``; without a recorded name, refq's own class for it).
    RegistryError when no registered class reads it."""
    _load_entry_points()
    if reference_type is None:
        builtin = next(
            (c for t, c in reference.REFERENCE_TYPES.items() if t.__name__ == float_type), None
        )
        reference_type = reference_name(builtin) if builtin else float_type
    cls = _READERS.get(reference_type)
    if cls is None:
        known = ", ".join(sorted(_READERS))
        raise RegistryError(
            f"no registered converter reads {float_type} modules named {reference_type!r}; "
            f"registered: {known}. Install the package whose converter wrote them (entry-point "
            f"group '{ENTRY_POINT_GROUP}')"
        )
    return cls


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
