"""Lazy module attributes (PEP 562): a package imports a submodule on first use.

Importing ``llm_mdp`` or ``llm_mdp.envs`` must stay light (no torch, no transformers), so
``llm-mdp --help`` and Gymnasium's id registration are fast; the classes those packages
export are imported when first read.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_attributes(
    namespace: dict[str, Any], lazy: dict[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for a package whose ``globals()`` is ``namespace``:
    ``lazy`` maps an attribute name to the module that defines it."""

    def __getattr__(name: str) -> Any:
        if name in lazy:
            value = getattr(importlib.import_module(lazy[name]), name)
            namespace[name] = value  # imported once
            return value
        raise AttributeError(f"module {namespace['__name__']!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(namespace.get("__all__", ())))

    return __getattr__, __dir__
