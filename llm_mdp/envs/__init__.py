"""The token-level MDP as Gymnasium environments (single and natively batched)."""

from llm_mdp.envs.registration import env_id, register_envs
from llm_mdp.envs.token_env import LLMTokenEnv
from llm_mdp.envs.vector_env import EnvStateError, LLMTokenVectorEnv

register_envs()

__all__ = ["EnvStateError", "LLMTokenEnv", "LLMTokenVectorEnv", "env_id", "register_envs"]
