"""Policy-gradient agents on the token MDP, all over one shared on-policy loop.

=============  =================================================  =====================
agent          per-token weight of ``grad log pi(w_t | s_t)``     paper
=============  =================================================  =====================
REINFORCE      ``RM(W) - b``                                      Williams 1992
RLOO           ``R_i - mean_{j != i} R_j``                         arXiv 2402.14740
ReMax          ``R_i - RM(greedy response)``                       arXiv 2310.10505
GRPO           ``(R_i - mean) / std`` (group)                      arXiv 2402.03300
PPO            GAE over a critic ``V_phi``                         arXiv 1707.06347
TRePO          ``V_hat(s_{t+1}) - V_hat(s_t)`` by Monte Carlo      arXiv 2506.02553
REINFORCE++    return-to-go normalised over the batch              arXiv 2501.03262
=============  =================================================  =====================
"""

from llm_mdp.agents.base import Agent, AgentConfig, TrainingError
from llm_mdp.agents.checkpoint import CheckpointError
from llm_mdp.agents.grpo import GRPO, GRPOConfig
from llm_mdp.agents.interrupt import TrainingInterrupted
from llm_mdp.agents.ppo import PPO, PPOConfig
from llm_mdp.agents.reinforce import REINFORCE, REINFORCEConfig
from llm_mdp.agents.reinforce_pp import REINFORCEPP, REINFORCEPPConfig
from llm_mdp.agents.remax import ReMax, ReMaxConfig
from llm_mdp.agents.rloo import RLOO, RLOOConfig
from llm_mdp.agents.rollout import Rollout, rollout, rollout_many
from llm_mdp.agents.trepo import TRePO, TRePOConfig

AGENTS: dict[str, type[Agent]] = {
    a.name: a for a in (REINFORCE, RLOO, ReMax, GRPO, PPO, TRePO, REINFORCEPP)
}


def get_agent(name: str) -> type[Agent]:
    """The agent class registered under ``name`` (``reinforce``, ``rloo``, ...)."""
    try:
        return AGENTS[name]
    except KeyError:
        raise ValueError(f"unknown agent {name!r}; known agents: {', '.join(AGENTS)}") from None


__all__ = [
    "AGENTS",
    "GRPO",
    "PPO",
    "REINFORCE",
    "REINFORCEPP",
    "RLOO",
    "Agent",
    "AgentConfig",
    "CheckpointError",
    "GRPOConfig",
    "PPOConfig",
    "REINFORCEConfig",
    "REINFORCEPPConfig",
    "RLOOConfig",
    "ReMax",
    "ReMaxConfig",
    "Rollout",
    "TRePO",
    "TRePOConfig",
    "TrainingError",
    "TrainingInterrupted",
    "get_agent",
    "rollout",
    "rollout_many",
]
