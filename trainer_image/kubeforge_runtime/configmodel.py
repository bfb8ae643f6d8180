"""The strict pydantic base of every runtime config (train, quantize, serve) and its messages.

Each entry point's config (``train/config.py``, ``quantize/config.py``, ``serve/config.py``) is
a pydantic model built on :class:`StrictConfig`, and the operator renders the matching
sub-models of its API into exactly that shape (``model_dump(by_alias=True)``); a contract test
per kind (``tests/unit/test_config_contract.py``) fails when the two schemas disagree.

Strict on purpose, because a value the runtime quietly reinterprets is a setting the user
believes is applied and is not:

* an unknown key, at any level, is an error naming the key (and the allowed ones);
* no coercion: ``"8"`` is not an integer, ``true`` is not 1, ``1.5`` is not an integer
  (an integer is a valid number, though); NaN and infinities are refused;
* out-of-range values and failed cross-field rules are errors naming the field.

:func:`parse` turns every ``ValidationError`` into the entry point's own ``ConfigError`` with one
readable line per problem, so a bad config still exits 78 (``contract.EXIT_CONFIG_ERROR``).
Nothing beyond pydantic is imported: the control plane's tests import these modules too.
"""

from __future__ import annotations

import types
import typing
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.alias_generators import to_camel

M = TypeVar("M", bound=BaseModel)


class StrictConfig(BaseModel):
    """Base of the runtime configs: unknown keys forbidden, no type coercion, finite numbers.

    Field names are the JSON keys; each field's docstring is its description.
    """

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, use_attribute_docstrings=True)


class CamelConfig(StrictConfig):
    """A :class:`StrictConfig` with snake_case attributes read from camelCase keys."""

    model_config = ConfigDict(alias_generator=to_camel, validate_by_alias=True, validate_by_name=False)


def parse(model: type[M], data: Any, error: type[Exception], *, quote_keys: bool = True, prefix: str = "") -> M:
    """``model`` validated from ``data``; raises ``error`` with one message per problem."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise error(prefix + describe(exc, model, quote_keys=quote_keys)) from None


def describe(exc: ValidationError, model: type[BaseModel], *, quote_keys: bool = True) -> str:
    """The problems of ``exc`` as ``path: what is wrong`` phrases joined by ``; ``."""
    return "; ".join(_message(err, model, quote_keys) for err in exc.errors(include_url=False))


def _path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _submodel(annotation: Any) -> type[BaseModel] | None:
    """The model class inside ``X``, ``X | None`` or ``list[X]``, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, list):
        for arg in typing.get_args(annotation):
            found = _submodel(arg)
            if found is not None:
                return found
    return None


def _keys(model: type[BaseModel]) -> list[str]:
    return sorted(f.alias or name for name, f in model.model_fields.items())


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    current: type[BaseModel] | None = model
    for part in loc:
        if isinstance(part, int) or current is None:
            continue
        field = next((f for n, f in current.model_fields.items() if part in (n, f.alias)), None)
        current = _submodel(field.annotation) if field is not None else None
    return current


_TYPES = {
    "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
    "float_type": "a number", "float_parsing": "a number",
    "bool_type": "true or false", "bool_parsing": "true or false",
    "string_type": "a string", "list_type": "a list",
    "model_type": "an object", "model_attributes_type": "an object", "dict_type": "an object",
}
_BOUNDS = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}


def _message(err: Any, model: type[BaseModel], quote_keys: bool) -> str:
    loc, kind, ctx = tuple(err["loc"]), err["type"], err.get("ctx") or {}
    path = _path(loc)
    where = path or "config"
    value = err.get("input")
    if kind == "extra_forbidden":
        parent = _model_at(model, loc[:-1])
        key = f"{path!r}" if quote_keys else path
        allowed = f"; allowed keys{' in ' + _path(loc[:-1]) if len(loc) > 1 else ''}: {_keys(parent)}" if parent else ""
        return f"unknown key {key}{allowed}"
    if kind == "missing":
        return f"{where}: required"
    if kind in _TYPES:
        got = type(value).__name__ if isinstance(value, (dict, list)) else repr(value)
        return f"{where}: expected {_TYPES[kind]}, got {got}"
    if kind == "literal_error":
        return f"{where}: {value!r} is not one of {ctx.get('expected')}"
    if kind in _BOUNDS:
        bound = next(iter(ctx.values()))
        return f"{where}: must be {_BOUNDS[kind]} {bound}, got {value!r}"
    if kind in ("too_short", "string_too_short"):
        return f"{where}: must not be empty" if ctx.get("min_length") == 1 else f"{where}: {err['msg']}"
    if kind == "finite_number":
        return f"{where}: must be a finite number"
    if kind in ("value_error", "assertion_error"):
        # Raised by the models' own rules, whose messages name the fields themselves.
        return str(err["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
    return f"{where}: {err['msg']}"
