"""Declarative config: the one validation mechanism for run configs, topologies, experiments, manifests and
synthetic configs (a leaf: imports only tpicore.errors and tpicore.units, plus pydantic and yaml).

A config record is a pydantic v2 model deriving from `Record` (frozen, unknown keys rejected with the
allowed ones listed); its fields use the annotated types below, whose checks raise `Invalid` with
today's wording. Validation errors of every kind become one TpiError line:

    <source>: <field.path>: <what is wrong>          e.g. "exp.yaml: options.window: must be an integer
                                                           >= 2, got 1", "x.yaml: links.latncy_ms: unknown
                                                           key (allowed: ...)", "devices[1].name: missing"

`<field.path>` joins the location with dots, list items as [i]. Constructing a Record directly
(`Link(latency_ms=-1)`) raises the same TpiError without the source; `load(Model, doc, source)` validates a
parsed document; `read_yaml` reads one file with the same error style. Must not import numpy, tpicore
packages above the leaves, or the emulator.
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Callable, Mapping, Sequence, TypeVar

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from tpicore import units
from tpicore.errors import TpiError

M = TypeVar("M", bound="Record")


class Invalid(ValueError):
    """A check failed: `message` says what was expected and what came; `field` (optional, a dotted path)
    is appended to the location where the check ran (a model-level check names its field here)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message, self.field = message, field


# ---------------------------------------------------------------------------------------------------
# Errors


def _path(loc: Sequence[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and part.startswith("("):  # a union member's tag, not a field
            continue
        else:
            out += f".{part}" if out else str(part)
    return out


_EXPECTED = {
    "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
    "float_type": "a number", "float_parsing": "a number", "string_type": "a text", "bool_type": "true or false",
    "bool_parsing": "true or false", "list_type": "a list", "tuple_type": "a list",
    "dict_type": "a mapping", "model_type": "a mapping", "model_attributes_type": "a mapping",
    "dataclass_type": "a mapping", "none_required": "null",
}


def error_parts(err: ValidationError, fields: Sequence[str] = ()) -> tuple[str, str]:
    """The first error of a pydantic ValidationError as (field path, what is wrong). `fields` names the
    positional arguments of a direct construction (their locations are argument indexes)."""
    e = err.errors()[0]
    loc = list(e["loc"])
    if loc and isinstance(loc[0], int) and loc[0] < len(fields) and e["type"] != "missing":
        loc[0] = fields[loc[0]]
    path = _path(loc)
    cause = (e.get("ctx") or {}).get("error")
    if isinstance(cause, ValidationError):  # a nested validation inside a check: its path continues ours
        inner, message = error_parts(cause)
        return _join(path, inner), message
    if isinstance(cause, Invalid):
        return _join(path, cause.field or ""), cause.message
    kind = e["type"]
    if kind == "missing":
        return path, "missing"
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):
        return path, "unknown key"
    if kind in _EXPECTED:
        return path, f"expected {_EXPECTED[kind]}, got {e['input']!r}"
    if isinstance(cause, Exception):
        return path, str(cause)
    return path, f"{e['msg'][0].lower()}{e['msg'][1:]}, got {e['input']!r}"


def _join(path: str, more: str) -> str:
    """'a.b' + 'c' -> 'a.b.c'; 'a' + '[1].c' -> 'a[1].c'."""
    if not path or not more:
        return path or more
    return path + (more if more.startswith("[") else f".{more}")


class SchemaError(TpiError):
    """A document that does not fit its schema: '<source>: <field.path>: <message>' (empty parts left out)."""

    def __init__(self, source: str, path: str, message: str) -> None:
        super().__init__(": ".join(p for p in (source, path, message) if p))
        self.source, self.path, self.message = source, path, message


def error_text(err: ValidationError, fields: Sequence[str] = ()) -> str:
    """'<field.path>: <what is wrong>' for the first error."""
    return str(SchemaError("", *error_parts(err, fields)))


@lru_cache(maxsize=None)
def _adapter(tp: Any) -> TypeAdapter:
    return TypeAdapter(tp)


def load(tp: Any, doc: Any, source: str = "", context: Mapping[str, Any] | None = None) -> Any:
    """Validate a parsed document into `tp` (a Record class, or any type pydantic knows); a SchemaError
    '<source>: <field.path>: ...' if it does not fit."""
    ctx = dict(context) if context is not None else None
    try:
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            return tp.model_validate(doc, context=ctx)
        return _adapter(tp).validate_python(doc, context=ctx)
    except ValidationError as e:
        raise SchemaError(source, *error_parts(e)) from None


def read_yaml(path: str | Path, what: str) -> Any:
    """A parsed YAML file; TpiError '<path>: cannot read <what> (...)' or '<path>: not valid YAML (...)'."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise TpiError(f"{path}: cannot read {what} ({e.strerror})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise TpiError(f"{path}: not valid YAML ({e})") from None


# ---------------------------------------------------------------------------------------------------
# The base of every config record


class _RecordMeta(type(BaseModel)):  # pydantic's model metaclass
    """Direct construction (`Link(latency_ms=5)`, `Device("a", 1, 2**30)`): positional values in field
    order, and a TpiError naming the field instead of a ValidationError. Validation of nested records
    does not pass through here (pydantic builds those itself), so their errors keep their full path."""

    def __call__(cls, *args: Any, **data: Any) -> Any:
        names = list(cls.model_fields)
        if len(args) > len(names):
            raise TpiError(f"{cls.__name__}: {len(args)} positional values for {len(names)} fields")
        data.update(zip(names, args))
        try:
            return super().__call__(**data)
        except ValidationError as e:
            raise SchemaError("", *error_parts(e)) from None


class Record(BaseModel, metaclass=_RecordMeta):
    """A frozen, validated record. Keyword or positional construction (in field order); errors are
    TpiError naming the field; unknown keys are listed with the allowed ones."""

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, doc: Any) -> Any:
        if isinstance(doc, Mapping):
            allowed = list(cls.model_fields)
            for key in doc:
                if key not in allowed:
                    raise Invalid(f"unknown key (allowed: {', '.join(allowed)})", field=str(key))
        return doc

    def replace(self: M, **changes: Any) -> M:
        """A copy with some fields changed, validated like a new record."""
        return type(self)(**{**dict(self), **changes})


# ---------------------------------------------------------------------------------------------------
# Field types: Annotated[<type>, BeforeValidator(check)], each check raising Invalid in today's wording


def check(fn: Callable[[Any], Any]) -> BeforeValidator:
    """A field check from fn(value) -> value; fn raises Invalid (or a units error, which it becomes)."""

    def run(value: Any) -> Any:
        try:
            return fn(value)
        except units.UnitError as e:
            raise Invalid(e.detail) from None

    return BeforeValidator(run)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def shown(value: Any) -> str:
    """A value for an error message: repr, with huge integers and floats in short scientific form."""
    if is_int(value) and abs(value) >= 10**15:
        return f"{float(value):.3g}" if abs(value) < 10**308 else f"an integer of {len(str(abs(value)))} digits"
    if isinstance(value, float) and math.isfinite(value) and abs(value) >= 1e15:
        return f"{value:.3g}"
    return repr(value)


def _range(lo: float, hi: float, unit: str = "") -> str:
    """'[1, 1024]' / '[0, 6e+04] ms': the allowed range, for an error message."""
    return f"[{lo:g}, {hi:g}]{f' {unit}' if unit else ''}"


def _binary(nbytes: int) -> str:
    """1125899906842624 -> '1 PiB' (the largest binary unit that divides it; else the plain number)."""
    for unit, size in (("PiB", 2**50), ("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= size and nbytes % size == 0:
            return f"{nbytes // size} {unit}"
    return str(nbytes)


def _int(minimum: int, maximum: int | None = None) -> Callable[[Any], int]:
    def fn(value: Any) -> int:
        if not is_int(value) or value < minimum:
            raise Invalid(f"must be an integer >= {minimum}, got {shown(value)}")
        if maximum is not None and value > maximum:
            raise Invalid(f"must be an integer in [{minimum}, {maximum}], got {shown(value)}")
        return value

    return fn


def Int(minimum: int, maximum: int | None = None) -> Any:
    """An integer >= minimum (bools refused): 'must be an integer >= N, got X'; with a maximum, one above it:
    'must be an integer in [N, M], got X'."""
    return Annotated[int, check(_int(minimum, maximum))]


def OptInt(minimum: int, maximum: int | None = None) -> Any:
    """None, or an integer in [minimum, maximum]."""
    return Annotated[int | None, check(lambda v: None if v is None else _int(minimum, maximum)(v))]


def Choice(*choices: str) -> Any:
    """One of the given strings: 'expected one of a, b, got X'."""

    def fn(value: Any) -> str:
        if value not in choices:
            raise Invalid(f"expected one of {', '.join(choices)}, got {value!r}")
        return value

    return Annotated[str, check(fn)]


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise Invalid(f"expected true or false, got {value!r}")
    return value


Flag = Annotated[bool, check(_flag)]


def Number(gt: float | None = None, ge: float | None = None, note: str = "", le: float | None = None) -> Any:
    """A finite number with a lower bound: 'must be > 0<note>, got X' / 'must be >= 0<note>, got X'. With an
    upper bound `le` (and `ge` beside `gt`: a smallest sane value), a value past it: 'must be in [lo, le]...'."""

    def fn(value: Any) -> float:
        v = units.number(value, "")
        if (gt is not None and not v > gt) or (ge is not None and gt is None and not v >= ge):
            bound = f"> {gt:g}" if gt is not None else f">= {ge:g}"
            raise Invalid(f"must be {bound}{note}, got {shown(value)}")
        if (ge is not None and v < ge) or (le is not None and v > le):
            low = f"[{ge:g}" if ge is not None else f"({gt:g}" if gt is not None else "(-inf"
            raise Invalid(f"must be in {low}, {le if le is not None else math.inf:g}]{note}, got {shown(value)}")
        return v

    return Annotated[float, check(fn)]


def Ms(ge: float = 0.0, le: float | None = None) -> Any:
    """Milliseconds (a number, or '5ms', '500us', '1s'), >= ge (and <= le)."""

    def fn(value: Any) -> float:
        v = units.parse_ms(value, "")
        if not v >= ge:
            raise Invalid(f"must be >= {ge:g}, got {v!r}")
        if le is not None and v > le:
            raise Invalid(f"must be in {_range(ge, le, 'ms')}, got {shown(v)} ms")
        return v

    return Annotated[float, check(fn)]


def Mbps(note: str = "", lo: float | None = None, hi: float | None = None) -> Any:
    """Megabits/s > 0 (a number, or '300mbps', '1gbit', '2GB/s'), or None ('unlimited'); with lo/hi, within
    [lo, hi] too."""

    def fn(value: Any) -> float | None:
        v = units.parse_mbps(value, "")
        if v is not None and not v > 0:
            raise Invalid(f"must be > 0{note}, got {v!r}")
        if v is not None and ((lo is not None and v < lo) or (hi is not None and v > hi)):
            raise Invalid(f"must be in {_range(lo or 0, hi if hi is not None else math.inf, 'Mbit/s')}{note}, "
                          f"got {shown(v)}")
        return v

    return Annotated[float | None, check(fn)]


def Bytes(optional: bool = False, maximum: int | None = None) -> Any:
    """Bytes > 0 (a whole number, or '8GiB', '500MB', '1e9'); optional: None too; with a maximum, at most that."""

    def fn(value: Any) -> int | None:
        if value is None and optional:
            return None
        v = units.parse_bytes(value, "")
        if v <= 0:
            raise Invalid(f"must be > 0, got {v}")
        if maximum is not None and v > maximum:
            raise Invalid(f"must be in [1, {_binary(maximum)}] bytes, got {shown(v)}")
        return v

    return Annotated[int | None, check(fn)] if optional else Annotated[int, check(fn)]


def Fraction(lo: float = 0.0, hi: float = 1.0) -> Any:
    """A fraction in [lo, hi) (0.01, or '1%')."""

    def fn(value: Any) -> float:
        v = units.parse_fraction(value, "")
        if not lo <= v < hi:
            raise Invalid(f"must be in [{lo:g}, {hi:g}), got {v!r}")
        return v

    return Annotated[float, check(fn)]


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise Invalid(f"expected a non-empty text, got {value!r}")
    return value


Text = Annotated[str, check(_text)]
OptText = Annotated[str | None, check(lambda v: None if v is None else _text(v))]
