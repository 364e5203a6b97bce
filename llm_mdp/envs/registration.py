"""Gymnasium registration: ``gymnasium.make("llm_mdp/<Task>-v0")`` and ``make_vec``.

Every built-in task gets an id; ``gymnasium.make_vec`` returns the native batched
:class:`~llm_mdp.envs.vector_env.LLMTokenVectorEnv` (``vector_entry_point``), not a
``SyncVectorEnv`` of single envs. Keyword arguments of ``make``/``make_vec`` go to the
env constructors, e.g. ``gymnasium.make("llm_mdp/Reverse-v0", task_kwargs={"partial": True})``.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym

from llm_mdp.tasks import TASKS

NAMESPACE = "llm_mdp"


def env_id(task: str) -> str:
    """The registered id of a built-in task: ``"target_token"`` -> ``"llm_mdp/TargetToken-v0"``."""
    return f"{NAMESPACE}/{''.join(p.capitalize() for p in task.split('_'))}-v0"


def _single(task: str) -> Any:
    def make(**kwargs: Any) -> Any:
        from llm_mdp.envs.token_env import LLMTokenEnv

        return LLMTokenEnv(kwargs.pop("task", task), **kwargs)

    return make


def _vector(task: str) -> Any:
    def make(num_envs: int = 1, **kwargs: Any) -> Any:
        from llm_mdp.envs.vector_env import LLMTokenVectorEnv

        kwargs.pop("render_mode", None) if kwargs.get("render_mode") is None else None
        return LLMTokenVectorEnv(kwargs.pop("task", task), num_envs, **kwargs)

    return make


def register_envs() -> None:
    """Register every built-in task (idempotent; runs on ``import llm_mdp``)."""
    for task in TASKS:
        eid = env_id(task)
        if eid in gym.registry:
            continue
        gym.register(id=eid, entry_point=_single(task), vector_entry_point=_vector(task))
