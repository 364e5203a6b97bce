"""Gymnasium registration: ``gymnasium.make("llm_mdp/<Task>-v0")`` and ``make_vec``.

Every task gets an id (the built-in ones on ``import llm_mdp``, tasks added with
:func:`~llm_mdp.tasks.register_task` when they are registered). Entry points are import
strings, so registering imports neither torch nor transformers, and the specs pickle
(SB3's ``SubprocVecEnv`` and Gymnasium's ``AsyncVectorEnv`` send them to workers).

* ``gymnasium.make(id, **kw)`` builds an :class:`~llm_mdp.envs.LLMTokenEnv`.
* ``gymnasium.make_vec(id, num_envs, **kw)`` builds the native batched
  :class:`~llm_mdp.envs.LLMTokenVectorEnv` (``vector_entry_point``), not a
  ``SyncVectorEnv`` of single envs, with Gymnasium's defaults: NumPy arrays and
  ``NEXT_STEP`` autoreset, so an ordinary Gymnasium loop runs forever. Pass
  ``backend="torch"`` / ``autoreset_mode="Disabled"`` (the built-in agents' mode) to
  change them. ``vectorization_mode="sync"`` or ``"async"`` give Gymnasium's own vector
  envs of ``LLMTokenEnv``\\ s instead.

Other keyword arguments go to the env constructors, e.g.
``gymnasium.make("llm_mdp/Reverse-v0", task_kwargs={"partial": True})``.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import gymnasium as gym

if TYPE_CHECKING:
    from gymnasium.vector import AutoresetMode

    from llm_mdp.envs.vector_env import Backend, LLMTokenVectorEnv

NAMESPACE = "llm_mdp"

BUILTIN_TASKS: tuple[str, ...] = (
    "target_token",
    "keyword",
    "reverse",
    "arithmetic",
    "hidden_rewards",
    "chat_keyword",
    "guess_number",
    "calculator",
)
"""Names of the built-in tasks (``llm_mdp.tasks.TASKS`` before any user registration);
listed here so that ``import llm_mdp`` registers their ids without building a task."""


def env_id(task: str) -> str:
    """The registered id of a task: ``"target_token"`` -> ``"llm_mdp/TargetToken-v0"``."""
    return f"{NAMESPACE}/{''.join(p.capitalize() for p in task.split('_'))}-v0"


def make_vector_env(
    task: Any,
    num_envs: int = 1,
    *,
    backend: Backend = "numpy",
    autoreset_mode: AutoresetMode | str = "NextStep",
    **kwargs: Any,
) -> LLMTokenVectorEnv:
    """``gymnasium.make_vec``'s entry point: an :class:`~llm_mdp.envs.LLMTokenVectorEnv`
    with Gymnasium's defaults (NumPy backend, ``NEXT_STEP`` autoreset)."""
    from llm_mdp.envs.vector_env import LLMTokenVectorEnv

    return LLMTokenVectorEnv(
        task, num_envs, backend=backend, autoreset_mode=autoreset_mode, **kwargs
    )


def register_env(task: str) -> str:
    """Register ``env_id(task)`` for the task named ``task`` (idempotent); returns the id."""
    eid = env_id(task)
    if eid not in gym.registry:
        gym.register(
            id=eid,
            entry_point="llm_mdp.envs.token_env:LLMTokenEnv",
            vector_entry_point="llm_mdp.envs.registration:make_vector_env",
            kwargs={"task": task},
        )
    return eid


def register_envs() -> None:
    """Register the id of every built-in task (idempotent; runs on ``import llm_mdp``)
    and of every task already added with :func:`~llm_mdp.tasks.register_task`."""
    names = list(BUILTIN_TASKS)
    tasks_module = sys.modules.get("llm_mdp.tasks.builtin")
    if tasks_module is not None:  # registered tasks exist only once the module is loaded
        names += [n for n in tasks_module.TASKS if n not in names]
    for task in names:
        register_env(task)
