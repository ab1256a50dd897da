"""The YAML spec, version 1: read with positions, validated, resolved to one QParamSpec per weight.

Every error names ``file:line:column``. The spec's fields are declared once, in the tables below;
the validator and the JSON Schema (``refq schema``) are both generated from them.
"""

from __future__ import annotations

import difflib
import fnmatch
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import yaml
from yaml.constructor import SafeConstructor

from refq_cli.errors import QParamsError, SpecError

SPEC_VERSION = 1
MAX_SPEC_BYTES = 4 * 1024 * 1024
MAX_SPEC_NODES = 100_000

DTYPE_NAMES = ("qint8", "quint8", "qint32", "int4", "uint4")
QSCHEME_NAMES = (
    "per_tensor_affine",
    "per_channel_affine",
    "per_tensor_symmetric",
    "per_channel_symmetric",
    "none",
)
OBSERVER_NAMES = ("minmax", "mse", "percentile", "fixed")


@dataclass(frozen=True)
class Field:
    """One key of the spec: its kind of value and what it means."""

    kind: str  # enum | int | number | bool | str | numbers | ints
    doc: str
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False


QPARAM_FIELDS: dict[str, Field] = {
    "dtype": Field(
        "enum", "Integer type of the codes (4-bit types are stored in 8 bits).", DTYPE_NAMES
    ),
    "qscheme": Field("enum", "Quantization scheme; none keeps the weight float.", QSCHEME_NAMES),
    "axis": Field("int", "Channel axis of per-channel schemes.", minimum=0),
    "observer": Field(
        "enum", "How scale and zero point are computed from the weight.", OBSERVER_NAMES
    ),
    "quant_min": Field("int", "Smallest code (defaults to the dtype's minimum)."),
    "quant_max": Field("int", "Largest code (defaults to the dtype's maximum)."),
    "percentile": Field(
        "number",
        "Percentile of |w| the percentile observer clips at.",
        minimum=50,
        maximum=100,
        exclusive_minimum=True,
    ),
    "scale": Field(
        "numbers",
        "Scale for observer fixed: a number, or one per channel.",
        minimum=0,
        exclusive_minimum=True,
    ),
    "zero_point": Field("ints", "Zero point for observer fixed: an integer, or one per channel."),
}
MODULE_FIELDS: dict[str, Field] = {
    "nonlinearity": Field("enum", "RNN and RNNCell nonlinearity.", ("tanh", "relu")),
    "batch_first": Field("bool", "Whether inputs are (batch, time, features)."),
    "dropout": Field(
        "number", "Dropout between layers (only active in training).", minimum=0, maximum=1
    ),
}
BUILTIN_DEFAULTS: dict[str, Any] = {
    "dtype": "qint8",
    "qscheme": "per_channel_symmetric",
    "axis": 0,
    "observer": "minmax",
    "percentile": 99.99,
}


@dataclass(frozen=True)
class Loc:
    """A position in a spec file, printed as ``file:line:column`` (both 1-based)."""

    file: str
    line: int
    column: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"

    @classmethod
    def of(cls, file: str, node: yaml.Node) -> Loc:
        return cls(file, node.start_mark.line + 1, node.start_mark.column + 1)


@dataclass(frozen=True)
class Setting:
    """A value from the spec and where it was written."""

    value: Any
    loc: Loc


Settings = dict[str, Setting]


@dataclass(frozen=True)
class Rule:
    match: str
    loc: Loc
    skip: bool | None = None  # None: this rule does not say
    fields: Settings = field(default_factory=dict)
    weights: dict[str, tuple[Loc, Settings]] = field(default_factory=dict)


@dataclass(frozen=True)
class Spec:
    """A validated spec file. ``to_dict()`` gives it back as plain data (for the artifact)."""

    path: str
    is_decomposed: bool = False
    defaults: Settings = field(default_factory=dict)
    rules: tuple[Rule, ...] = ()
    modules: dict[str, tuple[Loc, Settings]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        def plain(settings: Settings) -> dict[str, Any]:
            return {k: s.value for k, s in settings.items()}

        rules = []
        for rule in self.rules:
            entry: dict[str, Any] = {"match": rule.match, **plain(rule.fields)}
            if rule.skip is not None:
                entry["skip"] = rule.skip
            if rule.weights:
                entry["weights"] = {k: plain(v) for k, (_, v) in rule.weights.items()}
            rules.append(entry)
        return {
            "version": SPEC_VERSION,
            "is_decomposed": self.is_decomposed,
            "defaults": plain(self.defaults),
            "rules": rules,
            "modules": {k: plain(v) for k, (_, v) in self.modules.items()},
        }


@dataclass(frozen=True)
class QParamSpec:
    """How one weight is to be quantized, after defaults and rules are applied."""

    dtype: str
    qscheme: str
    axis: int
    observer: str
    percentile: float
    quant_min: int | None = None
    quant_max: int | None = None
    scale: float | list[float] | None = None
    zero_point: int | list[int] | None = None
    origin: Mapping[str, Loc] = field(default_factory=dict, compare=False)

    @property
    def keeps_float(self) -> bool:
        return self.qscheme == "none"

    def error(self, exc: QParamsError, where: str) -> SpecError:
        """Turn a parameter error into a spec error at the setting that caused it."""
        loc = self.origin.get(exc.field or "", None) or self.origin.get("observer")
        message = str(exc).split(": ", 1)[-1]
        prefix = f"{loc}: " if loc else ""
        return SpecError(f"{prefix}{where}: {message}")


# --- reading ----------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, reading ``1e-3`` as a float as YAML 1.2 (and editors) do."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_spec(path: str | Path) -> Spec:
    """Read and validate a spec file; raises SpecError naming file:line:column."""
    path = Path(path)
    name = str(path)
    try:
        if path.is_dir():
            raise SpecError(f"{name}: is a directory, not a spec file")
        size = path.stat().st_size
        if size > MAX_SPEC_BYTES:
            raise SpecError(
                f"{name}: {size} bytes is too large for a spec (limit {MAX_SPEC_BYTES} bytes)"
            )
        data = path.read_bytes()
    except FileNotFoundError:
        raise SpecError(f"{name}: no such spec file") from None
    except OSError as exc:
        raise SpecError(f"{name}: cannot read the spec: {exc.strerror or exc}") from None
    return parse_spec(data, name)


def parse_spec(data: bytes | str, name: str = "<spec>") -> Spec:
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data[: exc.start].count(b"\n") + 1
            raise SpecError(f"{name}:{line}:1: the spec is not UTF-8 text") from None
    else:
        text = data
    try:
        root = yaml.compose(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{name}:{mark.line + 1}:{mark.column + 1}" if mark else name
        raise SpecError(f"{where}: YAML syntax error: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"{name}: YAML error: {exc}") from None
    except RecursionError:
        raise SpecError(f"{name}: the spec is nested too deeply") from None
    if root is None:
        raise SpecError(f"{name}:1:1: the spec is empty; it needs at least 'version: 1'")
    return _SpecReader(name).read(root)


class _SpecReader:
    """Walks the composed YAML node tree, checking each value against the field tables."""

    _SCALAR_TAGS: ClassVar[frozenset[str]] = frozenset(
        {"tag:yaml.org,2002:" + t for t in ("str", "int", "float", "bool", "null")}
    )

    def __init__(self, name: str) -> None:
        self.name = name
        self.nodes = 0
        self.constructor = SafeConstructor()

    def loc(self, node: yaml.Node) -> Loc:
        return Loc.of(self.name, node)

    def fail(self, node: yaml.Node, message: str) -> SpecError:
        return SpecError(f"{self.loc(node)}: {message}")

    def count(self, node: yaml.Node) -> None:
        self.nodes += 1
        if self.nodes > MAX_SPEC_NODES:
            raise self.fail(node, f"the spec has more than {MAX_SPEC_NODES} values (alias bomb?)")

    def scalar(self, node: yaml.Node) -> Any:
        self.count(node)
        if not isinstance(node, yaml.ScalarNode):
            raise self.fail(node, "expected a single value here")
        if node.tag not in self._SCALAR_TAGS:
            raise self.fail(node, f"tag {node.tag!r} is not allowed in a spec")
        try:
            return self.constructor.construct_object(node)
        except (yaml.YAMLError, ValueError) as exc:
            raise self.fail(node, f"bad value: {exc}") from None

    def mapping(
        self, node: yaml.Node, allowed: Sequence[str] | None, what: str
    ) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        """Keys (as strings) to (key node, value node); duplicate and unknown keys are errors."""
        self.count(node)
        if not isinstance(node, yaml.MappingNode) or node.tag != "tag:yaml.org,2002:map":
            raise self.fail(node, f"{what} must be a mapping of keys to values")
        out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise self.fail(key_node, "merge keys (<<) are not supported in a spec")
            key = self.scalar(key_node)
            if not isinstance(key, str):
                raise self.fail(key_node, f"keys must be text, got {key!r}")
            if key in out:
                first = self.loc(out[key][0])
                raise self.fail(key_node, f"duplicate key {key!r} (first given at {first})")
            if allowed is not None and key not in allowed:
                hint = difflib.get_close_matches(key, allowed, n=1)
                did_you_mean = f"; did you mean {hint[0]!r}?" if hint else ""
                raise self.fail(
                    key_node,
                    f"unknown key {key!r} in {what}{did_you_mean} (allowed: {', '.join(allowed)})",
                )
            out[key] = (key_node, value_node)
        return out

    def sequence(self, node: yaml.Node, what: str) -> list[yaml.Node]:
        self.count(node)
        if not isinstance(node, yaml.SequenceNode):
            raise self.fail(node, f"{what} must be a list")
        return list(node.value)

    def value(self, node: yaml.Node, key: str, spec: Field) -> Any:
        if spec.kind in ("numbers", "ints") and isinstance(node, yaml.SequenceNode):
            items = [
                self.value(
                    n, key, replace(spec, kind=spec.kind[:-1] if spec.kind == "ints" else "number")
                )
                for n in self.sequence(node, key)
            ]
            if not items:
                raise self.fail(node, f"{key} must not be an empty list")
            return items
        value = self.scalar(node)
        kind = {"numbers": "number", "ints": "int"}.get(spec.kind, spec.kind)
        if kind == "enum":
            if not isinstance(value, str) or value.lower() not in spec.choices:
                hint = difflib.get_close_matches(str(value).lower(), spec.choices, n=1)
                did_you_mean = f"; did you mean {hint[0]!r}?" if hint else ""
                raise self.fail(
                    node,
                    f"{key} must be one of {', '.join(spec.choices)}, got {value!r}{did_you_mean}",
                )
            return value.lower()
        if kind == "bool":
            if not isinstance(value, bool):
                raise self.fail(node, f"{key} must be true or false, got {value!r}")
            return value
        if kind == "str":
            if not isinstance(value, str) or not value:
                raise self.fail(node, f"{key} must be non-empty text, got {value!r}")
            return value
        if kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise self.fail(node, f"{key} must be an integer, got {value!r}")
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(node, f"{key} must be a number, got {value!r}")
        elif not math.isfinite(value):
            raise self.fail(node, f"{key} must be a finite number, got {value!r}")
        self.check_range(node, key, spec, value)
        return value

    def check_range(self, node: yaml.Node, key: str, spec: Field, value: float) -> None:
        lo, hi = spec.minimum, spec.maximum
        if lo is not None and (value <= lo if spec.exclusive_minimum else value < lo):
            bound = f"greater than {lo:g}" if spec.exclusive_minimum else f"at least {lo:g}"
            raise self.fail(node, f"{key} must be {bound}, got {value!r}")
        if hi is not None and value > hi:
            raise self.fail(node, f"{key} must be at most {hi:g}, got {value!r}")

    def settings(self, node: yaml.Node, fields: Mapping[str, Field], what: str) -> Settings:
        items = self.mapping(node, list(fields), what)
        return {
            key: Setting(self.value(v, key, fields[key]), self.loc(v))
            for key, (_, v) in items.items()
        }

    def read(self, root: yaml.Node) -> Spec:
        top = self.mapping(
            root, ["version", "is_decomposed", "defaults", "rules", "modules"], "the spec"
        )
        if "version" not in top:
            raise self.fail(root, "missing 'version: 1' at the top of the spec")
        version_node = top["version"][1]
        version = self.scalar(version_node)
        if type(version) is not int or version != SPEC_VERSION:
            raise self.fail(
                version_node,
                f"spec version {version!r} is not supported; this refq reads version "
                f"{SPEC_VERSION}",
            )
        is_decomposed = False
        if "is_decomposed" in top:
            is_decomposed = self.value(top["is_decomposed"][1], "is_decomposed", Field("bool", ""))
        defaults = (
            self.settings(top["defaults"][1], QPARAM_FIELDS, "defaults")
            if "defaults" in top
            else {}
        )
        rules = (
            tuple(self.rule(node) for node in self.sequence(top["rules"][1], "rules"))
            if "rules" in top
            else ()
        )
        modules: dict[str, tuple[Loc, Settings]] = {}
        if "modules" in top:
            for key, (key_node, value_node) in self.mapping(
                top["modules"][1], None, "modules"
            ).items():
                modules[key] = (
                    self.loc(key_node),
                    self.settings(value_node, MODULE_FIELDS, f"modules.{key}"),
                )
        return Spec(self.name, is_decomposed, defaults, rules, modules)

    def rule(self, node: yaml.Node) -> Rule:
        allowed = ["match", "skip", "weights", *QPARAM_FIELDS]
        items = self.mapping(node, allowed, "a rule")
        if "match" not in items:
            raise self.fail(node, "a rule needs 'match: <glob over module paths>'")
        match = self.value(items["match"][1], "match", Field("str", ""))
        skip = None
        if "skip" in items:
            skip = self.value(items["skip"][1], "skip", Field("bool", ""))
        fields = {
            k: Setting(self.value(v, k, QPARAM_FIELDS[k]), self.loc(v))
            for k, (_, v) in items.items()
            if k in QPARAM_FIELDS
        }
        weights: dict[str, tuple[Loc, Settings]] = {}
        if "weights" in items:
            for key, (key_node, value_node) in self.mapping(
                items["weights"][1], None, "weights"
            ).items():
                weights[key] = (
                    self.loc(key_node),
                    self.settings(value_node, QPARAM_FIELDS, f"weights.{key}"),
                )
        return Rule(match, self.loc(items["match"][1]), skip, fields, weights)


# --- resolving --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModulePlan:
    """What the spec says about one recurrent module."""

    skip: bool
    facts: Settings
    weights: dict[str, QParamSpec]


ROOT = "<root>"  # how specs, reports and calibration files name a module at the root


def display_path(path: str) -> str:
    return path or ROOT


_FACT_TYPES = {
    "nonlinearity": ("RNN", "RNNCell"),
    "batch_first": ("RNN", "LSTM", "GRU"),
    "dropout": ("RNN", "LSTM", "GRU"),
}


def resolve(
    spec: Spec,
    modules: Mapping[str, Sequence[str]],
    types: Mapping[str, str] | None = None,
) -> dict[str, ModulePlan]:
    """Apply defaults and rules to every weight of every recurrent module (path -> weights).

    Globs and ``modules:`` keys see a module at the root as ``<root>``. A rule that matches no
    module, a weight glob that matches no weight of the modules its rule matches, and module
    facts for a path that is not a recurrent module (or, given ``types``, facts that do not
    apply to its type) are errors.
    """
    shown = {display_path(p): p for p in modules}
    for key, (loc, facts) in spec.modules.items():
        if key not in shown:
            raise SpecError(
                f"{loc}: modules.{key}: no recurrent module at this path; "
                f"found: {', '.join(shown) or 'none'}"
            )
        float_type = (types or {}).get(shown[key])
        for fact, setting in facts.items():
            if float_type is not None and float_type not in _FACT_TYPES[fact]:
                raise SpecError(
                    f"{setting.loc}: modules.{key}.{fact} does not apply to {float_type}; "
                    f"it is for {', '.join(_FACT_TYPES[fact])}"
                )
    for rule in spec.rules:
        matched = [p for name, p in shown.items() if fnmatch.fnmatchcase(name, rule.match)]
        if not matched:
            raise SpecError(
                f"{rule.loc}: rule match {rule.match!r} matches no recurrent module; "
                f"found: {', '.join(shown) or 'none'}"
            )
        for pattern, (loc, _) in rule.weights.items():
            if not any(fnmatch.fnmatchcase(w, pattern) for p in matched for w in modules[p]):
                names = sorted({w for p in matched for w in modules[p]})
                raise SpecError(
                    f"{loc}: weights.{pattern} matches no weight of {rule.match!r}; "
                    f"weights there: {', '.join(names)}"
                )

    base = {
        **{k: Setting(v, None) for k, v in BUILTIN_DEFAULTS.items()},  # type: ignore[arg-type]
        **spec.defaults,
    }
    plans = {}
    for name, path in shown.items():
        skip = False
        module_settings = dict(base)
        per_weight_layers: list[tuple[str, Settings]] = []
        for rule in spec.rules:
            if fnmatch.fnmatchcase(name, rule.match):
                skip = skip if rule.skip is None else rule.skip
                module_settings.update(rule.fields)
                per_weight_layers.extend((p, s) for p, (_, s) in rule.weights.items())
        weights = {}
        for weight in modules[path]:
            settings = dict(module_settings)
            for pattern, overrides in per_weight_layers:
                if fnmatch.fnmatchcase(weight, pattern):
                    settings.update(overrides)
            weights[weight] = _qparam_spec(settings, f"{name}.{weight}")
        facts = spec.modules[name][1] if name in spec.modules else {}
        plans[path] = ModulePlan(skip, facts, weights)
    return plans


def _qparam_spec(settings: Settings, where: str) -> QParamSpec:
    values = {k: s.value for k, s in settings.items()}
    origin = {k: s.loc for k, s in settings.items() if s.loc is not None}
    if values["observer"] != "fixed":
        for key in ("scale", "zero_point"):
            if key in values:
                raise SpecError(
                    f"{origin[key]}: {where}: {key} is only used with observer fixed, "
                    f"but the observer is {values['observer']}"
                )
    if values["observer"] == "fixed" and values["qscheme"] != "none":
        if "scale" not in values:
            loc = origin.get("observer")
            raise SpecError(f"{loc}: {where}: observer fixed needs a scale (and zero_point)")
        if "zero_point" not in values and not values["qscheme"].endswith("symmetric"):
            loc = origin.get("scale")
            raise SpecError(
                f"{loc}: {where}: observer fixed with {values['qscheme']} needs a zero_point"
            )
    return QParamSpec(**values, origin=origin)


# --- JSON Schema ------------------------------------------------------------------------------


def _field_schema(f: Field) -> dict[str, Any]:
    def scalar(kind: str) -> dict[str, Any]:
        out: dict[str, Any] = {"type": {"int": "integer", "number": "number"}[kind]}
        if f.minimum is not None:
            out["exclusiveMinimum" if f.exclusive_minimum else "minimum"] = f.minimum
        if f.maximum is not None:
            out["maximum"] = f.maximum
        return out

    if f.kind == "enum":
        schema: dict[str, Any] = {"type": "string", "enum": list(f.choices)}
    elif f.kind == "bool":
        schema = {"type": "boolean"}
    elif f.kind == "str":
        schema = {"type": "string", "minLength": 1}
    elif f.kind in ("numbers", "ints"):
        item = scalar("number" if f.kind == "numbers" else "int")
        schema = {"oneOf": [item, {"type": "array", "items": item, "minItems": 1}]}
    else:
        schema = scalar(f.kind)
    return {**schema, "description": f.doc}


def json_schema() -> dict[str, Any]:
    """The spec's JSON Schema (draft 2020-12), generated from the same tables as the validator."""
    qparams = {k: _field_schema(f) for k, f in QPARAM_FIELDS.items()}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "refq spec",
        "description": f"A refq quantization spec, version {SPEC_VERSION}.",
        "type": "object",
        "additionalProperties": False,
        "required": ["version"],
        "properties": {
            "version": {"const": SPEC_VERSION, "description": "Spec format version."},
            "is_decomposed": {
                "type": "boolean",
                "description": "Use the decomposed (torch.ops.quantized_decomposed) numerics.",
            },
            "defaults": {"$ref": "#/$defs/qparams", "description": "Applies to every weight."},
            "rules": {
                "type": "array",
                "description": "Applied in order; a later match overrides earlier ones field by "
                "field.",
                "items": {"$ref": "#/$defs/rule"},
            },
            "modules": {
                "type": "object",
                "description": "Constructor facts weights cannot tell, by module path.",
                "additionalProperties": {"$ref": "#/$defs/module"},
            },
        },
        "$defs": {
            "qparams": {"type": "object", "additionalProperties": False, "properties": qparams},
            "rule": {
                "type": "object",
                "additionalProperties": False,
                "required": ["match"],
                "properties": {
                    "match": {
                        "type": "string",
                        "minLength": 1,
                        "description": "Glob over module paths.",
                    },
                    "skip": {"type": "boolean", "description": "Leave matching modules float."},
                    "weights": {
                        "type": "object",
                        "description": "Per-weight overrides; keys are weight names or globs.",
                        "additionalProperties": {"$ref": "#/$defs/qparams"},
                    },
                    **qparams,
                },
            },
            "module": {
                "type": "object",
                "additionalProperties": False,
                "properties": {k: _field_schema(f) for k, f in MODULE_FIELDS.items()},
            },
        },
    }
