"""llm-mdp: LLM text generation as a token-level MDP, with policy-gradient agents and an
exact toolkit that checks every estimator against the true gradient.

Importing the package registers the Gymnasium ids ``llm_mdp/<Task>-v0`` and nothing
heavier: torch and transformers are imported when an env, a task or an agent is first
used (``llm_mdp.LLMTokenEnv``, ``from llm_mdp.agents import GRPO``, ...).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from llm_mdp import envs  # noqa: F401  (registers the Gymnasium ids; light: no torch)

if TYPE_CHECKING:
    from llm_mdp.envs import LLMTokenEnv, LLMTokenVectorEnv
    from llm_mdp.tasks import Task, make_task

__version__ = "0.1.0"

_LAZY = {
    "LLMTokenEnv": "llm_mdp.envs",
    "LLMTokenVectorEnv": "llm_mdp.envs",
    "Task": "llm_mdp.tasks",
    "make_task": "llm_mdp.tasks",
}

__all__ = ["LLMTokenEnv", "LLMTokenVectorEnv", "Task", "__version__", "make_task"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
