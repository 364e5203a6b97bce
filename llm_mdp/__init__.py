"""llm-mdp: LLM text generation as a token-level MDP, with policy-gradient agents and an
exact toolkit that checks every estimator against the true gradient.

Importing the package registers the Gymnasium ids ``llm_mdp/<Task>-v0`` and nothing
heavier: torch and transformers are imported when an env, a task or an agent is first
used (``llm_mdp.LLMTokenEnv``, ``from llm_mdp.agents import GRPO``, ...).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from llm_mdp import envs  # noqa: F401  (registers the Gymnasium ids; light: no torch)
from llm_mdp._lazy import lazy_attributes

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

__getattr__, __dir__ = lazy_attributes(globals(), _LAZY)
