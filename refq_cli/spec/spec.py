"""The YAML spec, version 1: read with positions, validated, resolved to one QParamSpec per weight.

Every error names ``file:line:column``. The spec's fields are declared once, in the tables below;
the validator and the JSON Schema (``refq schema``) are both generated from them.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from refq_cli.errors import QParamsError, SpecError, argument, shorten
from refq_cli.kinds import (
    DTYPE_NAMES,
    FACTS,
    OBSERVER_NAMES,
    QSCHEME_NAMES,
    ROUNDING_NAMES,
    Argument,
    chosen_on_calibration,
    display_path,
    facts_of,
    kinds_with_fact,
)
from refq_cli.spec.yaml_reader import (
    Field,
    Loc,
    Setting,
    Settings,
    YamlReader,
    compose,
    read_document,
)

SPEC_VERSION = 1


QPARAM_FIELDS: dict[str, Field] = {
    "dtype": Field(
        "enum", "Integer type of the codes (4-bit types are stored in 8 bits).", DTYPE_NAMES
    ),
    "qscheme": Field("enum", "Quantization scheme; none keeps the weight float.", QSCHEME_NAMES),
    "axis": Field("int", "Channel axis of per-channel schemes.", minimum=0),
    "observer": Field(
        "enum",
        "How scale and zero point are computed: from the weight (minmax, mse, percentile), "
        "on the layer's output error on calibration inputs (output; needs --calibration), "
        "or as written (fixed).",
        OBSERVER_NAMES,
    ),
    "rounding": Field(
        "enum",
        "How codes are chosen: nearest rounds each weight; gptq rounds column by column, "
        "spreading each rounding error over the rest on the calibration inputs (needs "
        "--calibration).",
        ROUNDING_NAMES,
    ),
    "quant_min": Field("int", "Smallest code (defaults to the dtype's minimum)."),
    "quant_max": Field("int", "Largest code (defaults to the dtype's maximum)."),
    "percentile": Field(
        "number",
        "Percentile p the percentile observer clips at, of the signed values (not |w|) per "
        "channel or per tensor: the range is [k-th largest, k-th smallest] of the n values, "
        "k = round(p / 100 * n), widened to hold 0.",
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


def _fact_field(fact: Argument) -> Field:
    if isinstance(fact.check, tuple):
        return Field("enum", fact.description, fact.check)
    if fact.check == "fraction":
        return Field("number", fact.description, minimum=0, maximum=1)
    assert fact.check == "bool", fact
    return Field("bool", fact.description)


MODULE_FIELDS: dict[str, Field] = {name: _fact_field(fact) for name, fact in FACTS.items()}
BUILTIN_DEFAULTS: dict[str, Any] = {
    "dtype": "qint8",
    "qscheme": "per_channel_symmetric",
    "axis": 0,
    "observer": "minmax",
    "rounding": "nearest",
    "percentile": 99.99,
}


# The report's probe: the seeded random input of modules without calibration inputs.
REPORT_FIELDS: dict[str, Field] = {
    "probe_steps": Field(
        "int",
        "Time steps of the report's random probe; 0 measures no output error (the report "
        "then says so) and skips the quantized forward passes on calibration inputs too.",
        minimum=0,
        maximum=1_000_000,
    ),
    "probe_sequences": Field(
        "int", "Sequences (the batch) of the report's random probe.", minimum=1, maximum=100_000
    ),
}


MAX_PROBE_ROWS = 100_000  # steps x sequences of the random probe: its memory is rows x features


@dataclass(frozen=True)
class ProbeSetting:
    """How the report measures a module's output error: ``steps`` x ``sequences`` of seeded
    random input where there are no calibration inputs; ``steps`` 0 measures nothing."""

    steps: int = 16
    sequences: int = 4

    @property
    def off(self) -> bool:
        return self.steps == 0

    def check(self, where: str) -> None:
        """Refuse a probe too big to hold (``where`` names what set it)."""
        if self.steps * self.sequences > MAX_PROBE_ROWS:
            raise SpecError(
                f"{where}: a probe of {self.steps:,} steps x {self.sequences:,} sequences is "
                f"{self.steps * self.sequences:,} rows; give at most {MAX_PROBE_ROWS:,} "
                "(probe_steps x probe_sequences)"
            )


def check_probe_setting(steps: int | None, sequences: int | None) -> dict[str, int]:
    """The probe's size a caller gives (``--probe-steps``, ``--probe-sequences``), checked, by
    its spec key; None: not given."""
    given = {}
    for key, value in (("probe_steps", steps), ("probe_sequences", sequences)):
        if value is None:
            continue
        low, high = REPORT_FIELDS[key].minimum, REPORT_FIELDS[key].maximum
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:  # type: ignore[operator]
            raise SpecError(
                f"{argument(key, value)}: give a whole number from {low:g} to {high:,.0f}"
            )
        given[key] = value
    return given


@dataclass(frozen=True)
class Rule:
    match: str
    loc: Loc
    skip: bool | None = None  # None: this rule does not say
    fields: Settings = field(default_factory=dict)
    weights: dict[str, tuple[Loc, Settings]] = field(default_factory=dict)


def with_dot(prefix: str) -> str:
    """A module-path prefix as refq records it: ``model`` and ``model.`` are ``model.``."""
    return prefix if prefix.endswith(".") else prefix + "."


@dataclass(frozen=True)
class Spec:
    """A validated spec file. ``to_dict()`` gives it back as plain data (for the artifact)."""

    path: str
    is_decomposed: bool = False
    defaults: Settings = field(default_factory=dict)
    rules: tuple[Rule, ...] = ()
    modules: dict[str, tuple[Loc, Settings]] = field(default_factory=dict)
    strip_prefix: str | None = None  # a wrapper's prefix every key loses ("model.", with its dot)
    report: Settings = field(default_factory=dict)  # REPORT_FIELDS

    @property
    def probe(self) -> ProbeSetting:
        return ProbeSetting(**{k.removeprefix("probe_"): s.value for k, s in self.report.items()})

    def probing(self, steps: int | None = None, sequences: int | None = None) -> Spec:
        """This spec, with the probe's size a caller gives beside it (``--probe-steps``,
        ``--probe-sequences``), which overrides the spec's ``report:``."""
        report, current = dict(self.report), self.probe
        given = check_probe_setting(steps, sequences)
        for key, value in given.items():
            if value != getattr(current, key.removeprefix("probe_")):  # the default: no change
                report[key] = Setting(value, Loc(argument(key, value), 0, 0))
        probed = replace(self, report=report)
        named = [argument(k, v) for k, v in given.items()]
        probed.probe.check(" and ".join(named) if named else self.path)
        return probed

    def stripping(self, prefix: str | None) -> Spec:
        """This spec, with the prefix a caller gives beside it (``--strip-prefix``)."""
        if prefix is None or with_dot(prefix) == self.strip_prefix:
            return self
        if not prefix.strip("."):
            raise SpecError(
                f"{argument('strip_prefix', prefix)}: give the prefix the checkpoint's keys "
                "start with, such as 'model.'"
            )
        if self.strip_prefix is not None:
            raise SpecError(
                f"{argument('strip_prefix', prefix)}: the spec {self.path} says strip_prefix: "
                f"{self.strip_prefix}; give one of them"
            )
        return replace(self, strip_prefix=with_dot(prefix))

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
        out = {
            "version": SPEC_VERSION,
            "is_decomposed": self.is_decomposed,
            "defaults": plain(self.defaults),
            "rules": rules,
            "modules": {k: plain(v) for k, (_, v) in self.modules.items()},
        }
        if self.strip_prefix is not None:
            out["strip_prefix"] = self.strip_prefix
        if self.report:  # only when set: artifacts of specs without it keep their bytes
            out["report"] = plain(self.report)
        return out


@dataclass(frozen=True)
class QParamSpec:
    """How one weight is to be quantized, after defaults and rules are applied."""

    dtype: str
    qscheme: str
    axis: int
    observer: str
    percentile: float
    rounding: str = "nearest"
    quant_min: int | None = None
    quant_max: int | None = None
    scale: float | list[float] | None = None
    zero_point: int | list[int] | None = None
    origin: Mapping[str, Loc] = field(default_factory=dict, compare=False)

    @property
    def keeps_float(self) -> bool:
        return self.qscheme == "none"

    @property
    def needs_calibration(self) -> bool:
        """Whether the scale or the rounding is chosen on calibration inputs."""
        return not self.keeps_float and chosen_on_calibration(self.observer, self.rounding)

    def error(self, exc: QParamsError, where: str) -> SpecError:
        """Turn a parameter error into a spec error at the setting that caused it."""
        loc = self.origin.get(exc.field or "", None) or self.origin.get("observer")
        message = str(exc).split(": ", 1)[-1]
        prefix = f"{loc}: " if loc else ""
        return SpecError(f"{prefix}{where}: {message}")


# --- reading ----------------------------------------------------------------------------------


def load_spec(path: str | Path) -> Spec:
    """Read and validate a spec file; raises SpecError naming file:line:column."""
    return _SpecReader(str(path), "spec", SpecError).read(read_document(path, "spec", SpecError))


def parse_spec(data: bytes | str, name: str = "<spec>") -> Spec:
    return _SpecReader(name, "spec", SpecError).read(compose(data, name, "spec", SpecError))


DICT_SPEC = "spec=<dict>"  # how messages name a spec given as a dict


def as_spec(spec: str | os.PathLike[str] | Spec | Mapping[str, Any]) -> Spec:
    """A spec given as a file's path, a :class:`Spec` or a dict of the file's contents (checked
    as the file would be; messages name it ``spec=<dict>`` and the key, without positions)."""
    if isinstance(spec, Spec):
        return spec
    if isinstance(spec, (str, os.PathLike)):
        return load_spec(spec)
    if not isinstance(spec, Mapping):
        raise SpecError(
            f"spec: give a spec file's path, a Spec or a dict, not {type(spec).__name__}"
        )
    try:
        text = yaml.safe_dump(dict(spec), sort_keys=False, allow_unicode=True)
    except yaml.YAMLError as exc:  # a value YAML cannot hold: a tensor, an object
        value = exc.args[1] if len(exc.args) > 1 else exc
        raise SpecError(
            f"{DICT_SPEC}: holds {shorten(value)} ({type(value).__name__}), which a spec cannot: "
            "give numbers, text, lists and dicts"
        ) from None
    except RecursionError:
        raise SpecError(f"{DICT_SPEC}: nested too deep for a spec") from None
    reader = _SpecReader(DICT_SPEC, "spec", SpecError, positions=False)
    return reader.read(compose(text, DICT_SPEC, "spec", SpecError))


# Python's fnmatch translates a glob in time growing with the square of its brackets: a glob of
# 20,000 '[' took 15 s. No module path or weight name comes near this length.
MAX_GLOB = 1_000


class _SpecReader(YamlReader):
    def check_glob(self, node: yaml.Node, key: str, glob: str) -> None:
        if len(glob) > MAX_GLOB:
            raise self.fail(node, f"{key} is a glob of {len(glob)} characters; at most {MAX_GLOB}")

    """Reads a spec document."""

    def read(self, root: yaml.Node) -> Spec:
        top = self.mapping(
            root,
            ["version", "is_decomposed", "strip_prefix", "defaults", "rules", "modules", "report"],
            "the spec",
        )
        self.version(top, root, SPEC_VERSION)
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
        if "modules" in top and not _is_empty(top["modules"][1]):  # "modules:" with all commented
            for key, (key_node, value_node) in self.mapping(
                top["modules"][1], None, "modules"
            ).items():
                modules[key] = (
                    self.loc(key_node),
                    self.settings(value_node, MODULE_FIELDS, f"modules.{key}"),
                )
        strip_prefix = None
        if "strip_prefix" in top:
            node = top["strip_prefix"][1]
            value = self.value(node, "strip_prefix", Field("str", ""))
            if not value.strip("."):
                raise self.fail(node, f"strip_prefix {value!r}: give a prefix, such as model.")
            strip_prefix = with_dot(value)
        report = (
            self.settings(top["report"][1], REPORT_FIELDS, "report")
            if "report" in top and not _is_empty(top["report"][1])
            else {}
        )
        spec = Spec(self.name, is_decomposed, defaults, rules, modules, strip_prefix, report)
        if report:
            spec.probe.check(str(self.loc(top["report"][1])))
        return spec

    def rule(self, node: yaml.Node) -> Rule:
        allowed = ["match", "skip", "weights", *QPARAM_FIELDS]
        items = self.mapping(node, allowed, "a rule")
        if "match" not in items:
            raise self.fail(node, "a rule needs 'match: <glob over module paths>'")
        match = self.value(items["match"][1], "match", Field("str", ""))
        self.check_glob(items["match"][1], "match", match)
        skip = None
        if "skip" in items:
            skip = self.value(items["skip"][1], "skip", Field("bool", ""))
        fields = {
            k: Setting(
                self.value(v, self.label(f"rules[match={match!r}]", k), QPARAM_FIELDS[k]),
                self.loc(v),
            )
            for k, (_, v) in items.items()
            if k in QPARAM_FIELDS
        }
        weights: dict[str, tuple[Loc, Settings]] = {}
        if "weights" in items:
            for key, (key_node, value_node) in self.mapping(
                items["weights"][1], None, "weights"
            ).items():
                self.check_glob(key_node, f"weights key {shorten(key)}", key)
                weights[key] = (
                    self.loc(key_node),
                    self.settings(value_node, QPARAM_FIELDS, f"weights.{key}"),
                )
        return Rule(match, self.loc(items["match"][1]), skip, fields, weights)


def _is_empty(node: yaml.Node) -> bool:
    """A key with nothing after it (``modules:`` whose entries are all commented out)."""
    return (
        isinstance(node, yaml.ScalarNode)
        and node.tag == "tag:yaml.org,2002:null"
        and (node.value in ("", "~", "null"))
    )


# --- resolving --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModulePlan:
    """What the spec says about one recurrent module."""

    skip: bool
    facts: Settings
    weights: dict[str, QParamSpec]


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
                f"found: {', '.join(shown) or 'none'}{_wrapper_hint(key, shown)}"
            )
        float_type = (types or {}).get(shown[key])
        for fact, setting in facts.items():
            if float_type is not None and fact not in facts_of(float_type):
                raise SpecError(
                    f"{setting.loc}: modules.{key}.{fact} does not apply to {float_type}; "
                    f"it is for {', '.join(kinds_with_fact(fact))}"
                )
    for rule in spec.rules:
        matched = [p for name, p in shown.items() if fnmatch.fnmatchcase(name, rule.match)]
        if not matched:
            raise SpecError(
                f"{rule.loc}: rule match {rule.match!r} matches no recurrent module; "
                f"found: {', '.join(shown) or 'none'}{_wrapper_hint(rule.match, shown)}"
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


def _wrapper_hint(glob: str, shown: Sequence[str]) -> str:
    """When ``glob`` names modules only once a wrapper's first path component is gone (a
    Lightning ``model.``, a DDP ``module.``), the option that strips it."""
    for name in shown:
        wrapper, dot, rest = name.partition(".")
        if dot and fnmatch.fnmatchcase(rest, glob):
            prefix = wrapper + "."
            return (
                f"; the checkpoint's modules are under {prefix!r}: add strip_prefix: {prefix} "
                f"to the spec or pass {argument('strip_prefix', prefix)}"
            )
    return ""


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
            "strip_prefix": {
                "type": "string",
                "minLength": 1,
                "description": "A prefix every checkpoint key loses before modules are found, "
                "such as a Lightning wrapper's model. or DDP's module.",
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
            "report": {
                "type": "object",
                "description": "What the report measures.",
                "additionalProperties": False,
                "properties": {k: _field_schema(f) for k, f in REPORT_FIELDS.items()},
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
