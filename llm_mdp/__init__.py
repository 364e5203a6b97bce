"""llm-mdp: LLM text generation as a token-level MDP, with policy-gradient agents and an
exact toolkit that checks every estimator against the true gradient.

Importing the package registers the Gymnasium ids ``llm_mdp/<Task>-v0``.
"""

from llm_mdp.envs import LLMTokenEnv, LLMTokenVectorEnv
from llm_mdp.tasks import Task, make_task

__version__ = "0.1.0"

__all__ = ["LLMTokenEnv", "LLMTokenVectorEnv", "Task", "__version__", "make_task"]
