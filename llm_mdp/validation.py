"""Type and range checks for configuration values, with errors that name the value.

Config dataclasses (``llm_mdp.agents.AgentConfig`` and subclasses) call
:func:`check_fields` in ``__post_init__``; the command line uses :func:`check_type` for
task-factory arguments. Every error names the field, the value and what was expected::

    GRPOConfig(learning_rate=-1)    ValueError: learning_rate=-1.0: expected a finite number > 0
    GRPOConfig(epochs="2")          TypeError: epochs='2': expected an int

Conversions are the lossless ones a config file needs: an ``int`` where a ``float`` is
expected becomes a float, a list where a fixed-length tuple is expected becomes a tuple.
Nothing else is coerced (``"true"`` is not a bool, ``1.5`` is not an int, ``"ab"`` is not
a list of strings).

This module imports nothing heavy: ``llm-mdp --help`` stays fast.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import math
import re
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Union

__all__ = ["Range", "check_fields", "check_type", "field_docs", "type_name"]


@dataclass(frozen=True)
class Range:
    """An interval a number must lie in; bounds are inclusive unless ``*_open``.

    Floats must also be finite (no NaN, no infinity). A tuple value is checked element
    by element; ``None`` (an optional field left unset) is not checked.
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def describe(self) -> str:
        """``"> 0"``, ``">= 1"``, ``"in [0, 1)"``..."""
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"in {left}{_num(self.low)}, {_num(self.high)}{right}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {_num(self.low)}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {_num(self.high)}"
        return "finite"

    def contains(self, x: float) -> bool:
        if isinstance(x, float) and not math.isfinite(x):
            return False
        if self.low is not None and (x <= self.low if self.low_open else x < self.low):
            return False
        return not (self.high is not None and (x >= self.high if self.high_open else x > self.high))

    def check(self, name: str, value: Any) -> None:
        """Raise ``ValueError`` naming ``name`` when ``value`` (or an element) is outside."""
        items = value if isinstance(value, tuple) else (value,)
        for x in items:
            if x is not None and not self.contains(x):
                kind = "a finite number" if isinstance(x, float) else "an integer"
                raise ValueError(f"{name}={value!r}: expected {kind} {self.describe()}")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def type_name(annotation: Any) -> str:
    """A short human name of a type annotation: ``int``, ``float or None``, ``'a' | 'b'``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in args)
    if origin in (tuple, list, dict):
        inner = ", ".join("..." if a is Ellipsis else type_name(a) for a in args)
        return f"{origin.__name__}[{inner}]" if args else origin.__name__
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))


def check_type(name: str, value: Any, annotation: Any) -> Any:
    """``value`` checked against ``annotation`` (and converted losslessly), else ``TypeError``.

    Supports ``bool``, ``int``, ``float``, ``str``, ``Literal``, unions / ``Optional``,
    ``tuple[...]``, ``list[X]``, ``dict[K, V]`` and ``Any``; any other class is checked
    with ``isinstance``, and an annotation that cannot be resolved accepts anything.
    """
    ok, converted = _match(value, annotation)
    if not ok:
        raise TypeError(f"{name}={value!r}: expected {_article(type_name(annotation))}")
    return converted


def _article(name: str) -> str:
    if " | " in name:
        return f"one of {name}"
    return f"{'an' if name[:1] in 'aeiou' else 'a'} {name}"


def _match(value: Any, ann: Any) -> tuple[bool, Any]:
    if ann is Any or (ann is None and value is None):
        return True, value
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is Literal:
        return (any(value == a and type(value) is type(a) for a in args), value)
    if origin in (Union, types.UnionType):
        for a in args:
            ok, v = _match(value, a)
            if ok:
                return True, v
        return False, value
    if ann is type(None):
        return value is None, value
    if ann is bool:
        return isinstance(value, bool), value
    if ann is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if ann is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False, value
        return True, float(value)
    if ann is str:
        return isinstance(value, str), value
    if origin is tuple:
        if not isinstance(value, tuple | list):
            return False, value
        elem = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if args and len(elem) != len(value):
            return False, value
        out = [_match(v, a) for v, a in zip(value, elem, strict=True)] if args else []
        return all(ok for ok, _ in out), tuple(v for _, v in out) if args else tuple(value)
    if origin in (list, collections.abc.Sequence):
        if not isinstance(value, list | tuple):
            return False, value
        out = [_match(v, args[0]) if args else (True, v) for v in value]
        return all(ok for ok, _ in out), [v for _, v in out]
    if origin is dict:
        if not isinstance(value, dict):
            return False, value
        if not args:
            return True, value
        keys = [_match(k, args[0]) for k in value]
        vals = [_match(v, args[1]) for v in value.values()]
        ok = all(k for k, _ in keys) and all(v for v, _ in vals)
        return ok, {k: v for (_, k), (_, v) in zip(keys, vals, strict=True)}
    if isinstance(ann, type):
        return isinstance(value, ann), value
    return True, value  # an annotation we cannot check: accept


def resolved_hints(obj: Callable[..., Any] | type) -> dict[str, Any]:
    """Annotations of a class's fields (its bases' too) or a function's parameters,
    resolved where possible.

    Names that only exist for type checkers (``if TYPE_CHECKING:`` imports) resolve to
    ``Any`` instead of failing the whole lookup.
    """
    if isinstance(obj, type):
        raw: dict[str, Any] = {}
        for klass in reversed(obj.__mro__):
            raw |= getattr(klass, "__annotations__", {})
        globalns = vars(sys.modules[obj.__module__])
    else:
        raw = dict(getattr(obj, "__annotations__", {}))
        globalns = getattr(obj, "__globals__", {})
    out: dict[str, Any] = {}
    for name, ann in raw.items():
        if isinstance(ann, str):
            try:
                ann = eval(ann, dict(globalns), {})  # annotations are code of the module itself
            except Exception:
                ann = Any
        out[name] = ann
    return out


def check_fields(obj: Any, ranges: dict[str, Range] | None = None) -> None:
    """Type-check every field of the dataclass instance ``obj`` (converting in place),
    then check the numeric ``ranges`` by field name. Raises ``TypeError`` / ``ValueError``
    naming the field and what was expected."""
    hints = resolved_hints(type(obj))
    for f in dataclasses.fields(obj):
        if f.name in hints:
            value = check_type(f.name, getattr(obj, f.name), hints[f.name])
            object.__setattr__(obj, f.name, value)
    for name, rule in (ranges or {}).items():
        if hasattr(obj, name):
            rule.check(name, getattr(obj, name))


_ATTR = re.compile(r"^(\s*)(\w+):\s*(.*)$")


def field_docs(cls: type) -> dict[str, str]:
    """Field documentation from the ``Attributes:`` sections of ``cls``'s docstrings (its
    own first, then its bases'), one line of text per field."""
    docs: dict[str, str] = {}
    for klass in cls.__mro__:
        for name, text in _attributes_section(inspect.cleandoc(klass.__doc__ or "")).items():
            docs.setdefault(name, text)
    return docs


def _attributes_section(doc: str) -> dict[str, str]:
    out: dict[str, str] = {}
    lines = doc.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Attributes:")
    except StopIteration:
        return out
    indent: int | None = None
    current: str | None = None
    for line in lines[start + 1 :]:
        if not line.strip():
            continue
        m = _ATTR.match(line)
        width = len(line) - len(line.lstrip())
        if indent is None:
            indent = width
        if width < indent:
            break
        if m and width == indent:
            current = m.group(2)
            out[current] = m.group(3).strip()
        elif current is not None:
            out[current] += " " + line.strip()
    return {k: " ".join(v.split()) for k, v in out.items()}
