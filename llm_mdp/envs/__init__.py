"""The token-level MDP as Gymnasium environments (single and natively batched).

Importing this package registers the Gymnasium ids; the env classes (and torch) are
imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from llm_mdp._lazy import lazy_attributes
from llm_mdp.envs.registration import env_id, register_env, register_envs

if TYPE_CHECKING:
    from llm_mdp.envs.token_env import LLMTokenEnv
    from llm_mdp.envs.vector_env import EnvStateError, LLMTokenVectorEnv

register_envs()

_LAZY = {
    "EnvStateError": "llm_mdp.envs.vector_env",
    "LLMTokenEnv": "llm_mdp.envs.token_env",
    "LLMTokenVectorEnv": "llm_mdp.envs.vector_env",
}

__all__ = [
    "EnvStateError",
    "LLMTokenEnv",
    "LLMTokenVectorEnv",
    "env_id",
    "register_env",
    "register_envs",
]

__getattr__, __dir__ = lazy_attributes(globals(), _LAZY)
