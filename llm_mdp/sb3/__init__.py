"""stable-baselines3 integration: the token MDP as an SB3 ``VecEnv`` and an SB3 policy over
any Hugging Face causal LM.

* :class:`LLMVecEnv`: :class:`~llm_mdp.envs.LLMTokenVectorEnv` (one batched env, no
  per-row Python envs) behind SB3's ``VecEnv`` API, with SB3's ``terminal_observation``
  and ``TimeLimit.truncated`` conventions.
* :func:`make_sb3_env`: the same, wrapped in SB3's ``VecMonitor`` (episode statistics).
* :class:`LMActorCriticPolicy`: an ``ActorCriticPolicy`` whose actor is the LM head at
  the last real token and whose critic is a linear value head on the LM's last hidden
  state; works with SB3's ``PPO`` and ``A2C`` unchanged::

      from stable_baselines3 import PPO
      from llm_mdp.sb3 import LMActorCriticPolicy, make_sb3_env

      env = make_sb3_env("target_token", num_envs=8)
      model = PPO(LMActorCriticPolicy, env, policy_kwargs={"model": my_hf_causal_lm})

stable-baselines3 is an optional dependency: ``pip install 'llm-mdp[sb3]'``. ``import
llm_mdp`` never imports it; importing this module without it raises ``ImportError``.
See ``docs/sb3.md``.
"""

from __future__ import annotations

try:
    import stable_baselines3  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "llm_mdp.sb3 needs stable-baselines3, an optional dependency: pip install 'llm-mdp[sb3]'"
    ) from exc

from llm_mdp.sb3.policy import LMActorCriticPolicy, LMCategoricalDistribution, TokenIdsExtractor
from llm_mdp.sb3.vec_env import LLMVecEnv, make_sb3_env

__all__ = [
    "LLMVecEnv",
    "LMActorCriticPolicy",
    "LMCategoricalDistribution",
    "TokenIdsExtractor",
    "make_sb3_env",
]
