"""Nested dataclasses <-> plain dicts, with errors that name the dotted key.

- :class:`ConfigError` (a ``ValueError``): ``str(err)`` is always ``"<dotted.key>: <problem>"``.
- :func:`from_dict`: builds a (nested) dataclass from a mapping. Unknown keys are errors (with
  close-match suggestions); values are coerced to the annotated type where that is unambiguous
  (int -> float, list -> tuple, a numeric string -> float, a scalar -> a 1-tuple for
  ``tuple[X, ...]``); a ``ValueError`` from a dataclass's ``__post_init__`` is re-raised as a
  :class:`ConfigError` with the dotted prefix (``"std: ..."`` inside ``method.time`` becomes
  ``"method.time.std: ..."``).
- :func:`to_dict`: the inverse, made of plain YAML-serialisable types (tuples become lists);
  ``from_dict(cls, to_dict(x)) == x``.
- :func:`parse_overrides` (``["a.b=1", "c=[1, 2]"]`` -> nested dict) and :func:`deep_merge`.
- :func:`yaml_load`: ``yaml.safe_load`` that also reads ``1e-4`` as a float (PyYAML's YAML 1.1
  resolver would read it as a string).

No tensors appear here.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from typing import Any, Mapping

import yaml

__all__ = ["ConfigError", "from_dict", "to_dict", "parse_overrides", "deep_merge", "yaml_load"]


class ConfigError(ValueError):
    """A configuration problem. ``key`` is the dotted key, ``problem`` the rest of the message.

    ``str(err) == f"{key}: {problem}"``, e.g. ``"optim.lr: expected a number > 0, got -1"``.
    Built as ``ConfigError(key, problem)`` or ``ConfigError("key: problem")`` (one message that
    starts with the key; its part before the first ``": "`` becomes ``key``).
    """

    def __init__(self, key: str, problem: str | None = None):
        if problem is None:
            key, sep, rest = str(key).partition(": ")
            key, problem = (key, rest) if sep else ("<config>", key)
        self.key = key
        self.problem = problem
        super().__init__(f"{key}: {problem}")

    def prefixed(self, prefix: str) -> "ConfigError":
        """The same error with ``prefix`` put in front of the key (``"method.time"`` + ``"std"``)."""
        if not prefix:
            return self
        keys = ", ".join(f"{prefix}.{k.strip()}" for k in self.key.split(","))
        return ConfigError(keys, self.problem)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _from_value_error(err: ValueError, path: str) -> ConfigError:
    """A ``__post_init__`` ValueError ("name: problem") as a ConfigError under ``path``."""
    if isinstance(err, ConfigError):
        return err.prefixed(path)
    msg = str(err)
    head, sep, rest = msg.partition(": ")
    if sep and re.fullmatch(r"[A-Za-z_][\w.]*(\s*,\s*[A-Za-z_][\w.]*)*", head):
        return ConfigError(head, rest).prefixed(path)
    return ConfigError(path or "<config>", msg)


# --------------------------------------------------------------------------------------------
# YAML
# --------------------------------------------------------------------------------------------

class _Loader(yaml.SafeLoader):
    """SafeLoader whose floats also match ``1e-4`` / ``3E5`` (no dot, unsigned exponent)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                 |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                 |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                 |[-+]?\.(?:inf|Inf|INF)
                 |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def yaml_load(text: str) -> Any:
    """Parses YAML text safely (no object construction), reading ``1e-4`` as a float."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


# --------------------------------------------------------------------------------------------
# from_dict / to_dict
# --------------------------------------------------------------------------------------------

def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` as an instance of the annotation ``tp``; ConfigError naming ``key`` if not."""
    if tp is Any or tp is object:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(key, f"expected {_type_name(tp)}, got None")
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _coerce(value, option, key)
            except ConfigError as err:
                if dataclasses.is_dataclass(option) and isinstance(value, Mapping):
                    raise
                errors.append(err.problem)
        names = " or ".join(_type_name(o) for o in options)
        raise ConfigError(key, f"expected {names}{' or null' if type(None) in args else ''}, "
                               f"got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(key, f"expected a mapping (section {tp.__name__}), got {value!r}")
        return from_dict(tp, value, key)
    if origin is tuple:
        if isinstance(value, (list, tuple)):
            items = list(value)
        elif len(args) == 2 and args[1] is Ellipsis and not isinstance(value, (Mapping, str, bytes)):
            items = [value]  # a scalar is an unambiguous 1-tuple
        else:
            raise ConfigError(key, f"expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(items))
        if args:
            if len(items) != len(args):
                raise ConfigError(key, f"expected a list of {len(args)} items, got {value!r}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(items, args)))
        return tuple(items)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") if args else v for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(key, f"expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(key, f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(key, f"expected an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(key, f"expected a number, got {value!r}")
        # No option means anything at nan or inf (YAML's .nan/.inf): they would only reach the
        # loss as NaN, far from the key that caused it.
        if not math.isfinite(number):
            raise ConfigError(key, f"expected a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(key, f"expected a string, got {value!r}")
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise ConfigError(key, f"expected {tp.__name__}, got {value!r}")
    return value


def _suggest(key: str, names: list[str]) -> str:
    close = difflib.get_close_matches(key, names, n=3, cutoff=0.6)
    if close:
        return "did you mean " + " or ".join(repr(c) for c in close) + "?"
    return "valid keys: " + ", ".join(names)


def from_dict(cls, data: Mapping[str, Any] | None, path: str = ""):
    """An instance of the dataclass ``cls`` built from ``data`` (missing keys take defaults).

    ``path`` is the dotted prefix used in error messages (``""`` at the root). Raises
    :class:`ConfigError` for an unknown key (suggesting close matches), a value of the wrong
    type, a missing required field, or a ``ValueError`` from ``__post_init__`` (prefixed).
    """
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(path or "<config>", f"expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if not isinstance(key, str) or key not in fields:
            raise ConfigError(_join(path, str(key)), f"unknown key; {_suggest(str(key), list(fields))}")
        kwargs[key] = _coerce(value, hints.get(key, Any), _join(path, key))
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING \
                and f.default_factory is dataclasses.MISSING:
            raise ConfigError(_join(path, name), "missing required key")
    try:
        return cls(**kwargs)
    except ValueError as err:
        raise _from_value_error(err, path) from None


def to_dict(instance) -> dict:
    """A dataclass instance as a dict of plain types (dict, list, str, int, float, bool, None)."""
    if not dataclasses.is_dataclass(instance) or isinstance(instance, type):
        raise TypeError(f"instance: expected a dataclass instance, got {type(instance).__name__}")
    return {f.name: _plain(getattr(instance, f.name)) for f in dataclasses.fields(instance)}


def _plain(value):
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_dict(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


# --------------------------------------------------------------------------------------------
# Overrides
# --------------------------------------------------------------------------------------------

_KEY = re.compile(r"[A-Za-z_][\w-]*(\.[A-Za-z_][\w-]*)*")


def parse_overrides(items: list[str] | tuple[str, ...]) -> dict:
    """Command-line overrides ``["optim.lr=1e-4", "sample.steps=[1,2]"]`` as a nested dict.

    Values are parsed as YAML (``1e-4`` -> float, ``[1,2]`` -> list, ``null`` -> None, ``abc``
    -> ``"abc"``). Later items win. A malformed item raises :class:`ConfigError`.
    """
    result: dict = {}
    for item in items:
        if not isinstance(item, str) or "=" not in item:
            raise ConfigError(str(item), "expected an override KEY=VALUE, e.g. optim.lr=1e-4")
        key, _, text = item.partition("=")
        key = key.strip()
        if not _KEY.fullmatch(key):
            raise ConfigError(key or "<empty>", f"malformed key in override {item!r}; "
                                                "expected dotted names like optim.lr")
        try:
            value = yaml_load(text) if text.strip() else None
        except yaml.YAMLError as err:
            problem = str(err).splitlines()[0]
            raise ConfigError(key, f"cannot parse the value {text!r} as YAML ({problem})") from None
        nested: Any = value
        for part in reversed(key.split(".")):
            nested = {part: nested}
        result = deep_merge(result, nested)
    return result


def require_section(value: object, key: str) -> Mapping:
    """``value`` if it is a mapping (a section of settings), else a ConfigError naming ``key``."""
    if not isinstance(value, Mapping):
        raise ConfigError(key, f"expected a mapping (a section of settings), got {value!r}")
    return value


def deep_merge(base: Mapping, override: Mapping, _path: str = "") -> dict:
    """A new dict: ``base`` with ``override`` merged in (mappings merge, everything else replaces).

    Raises ConfigError naming the key where ``override`` brings a mapping (a section) but
    ``base`` holds something else there (``run: 5``, or an empty ``run:`` section, which YAML
    reads as null): replacing it would hide the bad value from validation.
    """
    merged = dict(base)
    for key, value in override.items():
        name = f"{_path}.{key}" if _path else str(key)
        if isinstance(value, Mapping) and key in merged:
            require_section(merged[key], name)
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value, name)
        else:
            merged[key] = value
    return merged
