"""Policies for the token MDP: any Hugging Face causal LM, a tabular policy, tiny models.

* :class:`CausalLMPolicy` wraps an ``AutoModelForCausalLM`` (KV-cached ``act``,
  one-forward teacher-forced ``log_probs``).
* :class:`TabularPolicy` has one logit vector per tree node, for exact tests.
* :func:`tiny_gpt2`, :func:`tiny_llama` build small random models offline.
* :class:`Policy` is the protocol agents type against.
"""

from .base import Observation, Policy
from .causal_lm import CausalLMPolicy, KVState
from .sampling import make_generator, sample_categorical, sample_from_logits
from .tabular import TabularPolicy
from .tiny import tiny_gpt2, tiny_llama

__all__ = [
    "CausalLMPolicy",
    "KVState",
    "Observation",
    "Policy",
    "TabularPolicy",
    "make_generator",
    "sample_categorical",
    "sample_from_logits",
    "tiny_gpt2",
    "tiny_llama",
]
