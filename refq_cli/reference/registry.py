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
from refq_cli.errors import RefqError, shorten
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
    :mod:`refq_cli.reference`'s modules (it is rebuilt from the artifact as they are) for
    ``float_type`` or a base of it. A name another class reads already is refused unless
    ``replace``, and even then while another registered converter still builds that class.
    """

    def add(converter: Converter) -> Converter:
        if float_type in _CONVERTERS and not replace:
            raise RegistryError(
                f"a converter for {describe(float_type)} is already registered "
                f"({describe(_CONVERTERS[float_type])}); pass replace=True to override it"
            )
        cls = reader or _class_of(converter)
        if cls is not None:
            _add_reader(cls, float_type, replace)
        _CONVERTERS[float_type] = converter
        return converter

    return add


def _class_of(converter: Converter) -> type[nn.Module] | None:
    """The reference class whose ``from_float`` classmethod ``converter`` is, if it is one."""
    owner = getattr(converter, "__self__", None)
    return owner if isinstance(owner, type) and issubclass(owner, QuantizedWeightsMixin) else None


def _add_reader(cls: type[nn.Module], float_type: type[nn.Module], replace: bool) -> None:
    if not (isinstance(cls, type) and issubclass(cls, QuantizedWeightsMixin)):
        raise RegistryError(
            f"reader {describe(cls)} is no subclass of refq's reference modules "
            "(refq_cli.reference), which artifacts are read back into"
        )
    if not isinstance(getattr(cls, "_NAME", None), str):
        raise RegistryError(f"reader {describe(cls)} has no _NAME, the name artifacts record")
    stands_for = cls._FLOAT_TYPE  # type: ignore[attr-defined]
    if not issubclass(float_type, stands_for):
        raise RegistryError(
            f"{describe(cls)} stands for {describe(stands_for)}, not {describe(float_type)}: "
            "it cannot read back what that converts to"
        )
    name = reference_name(cls)
    current = _READERS.get(name, cls)
    if current is not cls:
        builders = [
            t for t, c in _CONVERTERS.items() if t is not float_type and _class_of(c) is current
        ]
        if not replace or builders:
            raise RegistryError(
                f"{describe(current)} already reads modules named {name!r}"
                + (f", which the converter of {describe(builders[0])} writes" if builders else "")
                + f"; give {describe(cls)} a name of its own (_NAME)"
                + ("" if builders else " or pass replace=True")
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
            f"no registered converter reads {float_type} modules named "
            f"{shorten(reference_type)}; registered: {known}. Install the package whose "
            f"converter wrote them (entry-point group '{ENTRY_POINT_GROUP}')"
        )
    stands_for = cls._FLOAT_TYPE.__mro__  # type: ignore[attr-defined]
    if float_type not in {t.__name__ for t in stands_for if t.__module__.startswith("torch.nn")}:
        raise RegistryError(
            f"the artifact records a {float_type} module named {shorten(reference_type)}, but "
            f"{describe(cls)}, which reads that name, stands for "
            f"{describe(cls._FLOAT_TYPE)}"  # type: ignore[attr-defined]
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


def converted(module: nn.Module, qparams: Mapping[str, Any]) -> nn.Module:
    """``module`` converted by its registered converter, which must make a refq reference
    module (one that artifacts can hold and read back)."""
    converter = converter_for(module)
    ref = converter(module, qparams)
    if not isinstance(ref, QuantizedWeightsMixin):
        raise RegistryError(
            f"the converter of {describe(type(module))} ({describe(converter)}) made "
            f"{shorten(ref)}, not a refq reference module (a subclass of refq_cli.reference's)"
        )
    return ref


def check_converter(float_type: type[nn.Module]) -> None:
    """Before any work: refuse a converter for ``float_type`` that is a class's ``from_float``
    when the registry would not read that class's modules back as that class. (What a plain
    function makes is known once it has run: :func:`check_readable`.)"""
    cls = _class_of(converters().get(float_type))  # type: ignore[arg-type]
    if cls is not None:
        _check_reader(cls, reference_name(cls), float_type.__name__)


def check_readable(ref: nn.Module, float_type: str) -> None:
    """Refuse a converted module that ``load_artifact`` would not rebuild as itself: its class
    must be the one the registry reads modules of its name (``_get_name()``) with."""
    _check_reader(type(ref), ref._get_name(), float_type)


def _check_reader(cls: type[nn.Module], name: str, float_type: str) -> None:
    reader = reader_for(name, float_type)
    if reader is not cls:
        raise RegistryError(
            f"the converter of {float_type} makes a {describe(cls)} named {name!r}, but "
            f"{describe(reader)} reads modules of that name back from artifacts; register the "
            "converter with reader= its class, or give the class a name of its own (_NAME)"
        )


def describe(obj: Any) -> str:
    """``module.Qualified.name`` of a type or function; a classmethod is named by its class;
    anything else by its repr, shortened."""
    owner = getattr(obj, "__self__", None)
    if isinstance(owner, type):
        return f"{owner.__module__}.{owner.__qualname__}.{obj.__name__}"
    module, name = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    return f"{module}.{name}" if isinstance(module, str) and isinstance(name, str) else shorten(obj)


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
