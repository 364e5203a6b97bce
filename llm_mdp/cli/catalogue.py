"""What ``train --list`` and ``train --help`` print: tasks, agents, every config field.

Each agent config field is listed once with its type, its allowed range, its default
(and the agents whose default differs) and the documentation from the config classes'
``Attributes:`` docstrings (:func:`llm_mdp.validation.field_docs`).
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import textwrap
from typing import TYPE_CHECKING

from llm_mdp.cli.options import TINY_LR
from llm_mdp.validation import field_docs, resolved_hints, type_name

if TYPE_CHECKING:
    from llm_mdp.agents import Agent

WIDTH = 100


def catalogue() -> str:
    """Tasks with their factory arguments, agents, and every agent config field."""
    from llm_mdp.agents import AGENTS, AgentConfig
    from llm_mdp.tasks import TASK_FAMILIES, TASKS

    lines = ["tasks (--task NAME; factory arguments with --task-arg NAME=VALUE):"]
    for name, factory in sorted(TASKS.items()):
        doc = (inspect.getdoc(factory) or "").splitlines()
        lines.append(f"  {name:<15} {doc[0] if doc else ''}")
        params = [
            f"{p.name}={p.default!r}"
            for p in inspect.signature(factory).parameters.values()
            if p.name != "tokenizer" and p.default is not inspect.Parameter.empty
        ]
        lines += _wrap(", ".join(params), 18)
    lines.append("\ntask families (--task PREFIX:NAME; the package is an optional extra):")
    for prefix, family in sorted(TASK_FAMILIES.items()):
        doc = (inspect.getdoc(family) or "").splitlines()
        lines.append(f"  {prefix + ':<name>':<15} {doc[0] if doc else ''}")
    lines.append("\nagents (--agent NAME):")
    for name, cls in AGENTS.items():
        doc = (inspect.getdoc(sys.modules[cls.__module__]) or "").splitlines()
        lines.append(f"  {name:<15} {doc[0] if doc else cls.__name__}")
    lines.append(
        "\nagent config fields (--set FIELD=VALUE, values as JSON; a config file's "
        "[agent_config] table; with tiny-gpt2 / tiny-llama the CLI's learning_rate is "
        f"{TINY_LR} unless --lr or --set gives one):"
    )
    base = {f.name: f.default for f in dataclasses.fields(AgentConfig)}
    seen: list[str] = list(base)
    for cls in AGENTS.values():
        seen += [f.name for f in dataclasses.fields(cls.config_class) if f.name not in seen]
    for field in seen:
        lines += _describe(field, base, AGENTS)
    return "\n".join(lines)


def _describe(field: str, base: dict[str, object], agents: dict[str, type[Agent]]) -> list[str]:
    owners = [a for a in agents.values() if field in _defaults(a.config_class)]
    cls = owners[0].config_class
    hint = resolved_hints(cls).get(field)
    rule = cls.field_ranges.get(field)
    kind = type_name(hint) + (f", {rule.describe()}" if rule else "")
    if field in base:
        default = f"default {base[field]!r}"
        diff = [
            f"{a.name} {_defaults(a.config_class)[field]!r}"
            for a in agents.values()
            if _defaults(a.config_class)[field] != base[field]
        ]
        default += f" ({', '.join(diff)})" if diff else ""
    else:
        default = ", ".join(
            f"{a.name}: default {_defaults(a.config_class)[field]!r}" for a in owners
        )
        default += " only"
    doc = field_docs(cls).get(field, "").replace("``", "")
    return [f"  {field} ({kind}) {default}", *_wrap(doc, 6)]


def _defaults(config_class: type) -> dict[str, object]:
    return {f.name: f.default for f in dataclasses.fields(config_class)}


def _wrap(text: str, indent: int) -> list[str]:
    return textwrap.wrap(text, WIDTH, initial_indent=" " * indent, subsequent_indent=" " * indent)
