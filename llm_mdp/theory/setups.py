"""Ready-made exact set-ups: the small set-up of ``docs/theory.md#the-token-mdp``.

With a tabular or a tiny transformer policy.
"""

from __future__ import annotations

from typing import Any

from llm_mdp.policies import CausalLMPolicy, TabularPolicy, tiny_gpt2, tiny_llama
from llm_mdp.tasks import hidden_rewards_task

from .moments import ExactModel

__all__ = ["POLICY_KINDS", "make_policy", "paper_setup"]

POLICY_KINDS = ("tabular", "gpt2", "llama")

PROMPT = "a"
ALPHABET = "ab"
# char_tokenizer("ab"): 0 = <eos> (also the pad token), 1 = 'a', 2 = 'b': every id is an action.
EOS, A, B = 0, 1, 2
ACTIONS = (EOS, A, B)


def make_policy(kind: str, horizon: int, seed: int, *, init_scale: float = 1.0) -> Any:
    """A policy over the 3-token char vocabulary of :func:`paper_setup`.

    ``"tabular"``: :class:`TabularPolicy` with ``N(0, init_scale^2)`` logits. ``"gpt2"`` /
    ``"llama"``: a one-layer 16-wide :class:`CausalLMPolicy` (a few thousand parameters),
    initialised with std ``0.5 * init_scale`` so that its policy is far from uniform.
    """
    if kind == "tabular":
        return TabularPolicy(len(ACTIONS), EOS, horizon, [(A,)], seed=seed, init_scale=init_scale)
    common: dict[str, Any] = {
        "n_layer": 1,
        "n_embd": 16,
        "n_head": 2,
        "max_positions": 16,
        "seed": seed,
        "pad_token_id": EOS,
        "eos_token_id": EOS,
        "init_std": 0.5 * init_scale,
    }
    model: Any
    if kind == "gpt2":
        model = tiny_gpt2(len(ACTIONS), **common)
    elif kind == "llama":
        model = tiny_llama(len(ACTIONS), n_kv_head=1, **common)
    else:
        raise ValueError(f"policy must be one of {POLICY_KINDS}, got {kind!r}")
    return CausalLMPolicy(model, seed=seed)


def paper_setup(
    *,
    gamma: float = 1.0,
    horizon: int = 4,
    length_cap: str = "force-eos",
    seed: int = 0,
    policy: str | Any = "tabular",
    init_scale: float = 1.0,
) -> ExactModel:
    """The small set-up of ``docs/theory.md#the-token-mdp``.

    Prompt ``"a"``, actions ``{a, b, EOS}``, random token rewards.

    Token rewards ``r(s_t, w_t) ~ U(-1, 1)`` from :func:`~llm_mdp.tasks.hidden_rewards_task`
    (``seed``), ``RM(W) = sum_t gamma^(t-1) r_t``. ``length_cap="force-eos"`` with
    ``horizon=4`` gives the 15 responses (``{a,b}^k EOS``, ``k = 0..3``);
    ``"env"`` the env's rule (31 responses for ``horizon=4``). ``policy`` is a kind from
    :data:`POLICY_KINDS` (seeded with ``seed``) or a policy object over the same vocabulary.
    """
    task = hidden_rewards_task(
        alphabet=ALPHABET, max_response_tokens=horizon, gamma=gamma, prompts=(PROMPT,), seed=seed
    )
    pol = (
        make_policy(policy, horizon, seed, init_scale=init_scale)
        if isinstance(policy, str)
        else policy
    )
    return ExactModel.from_task(
        pol, task, horizon=horizon, length_cap=length_cap, actions=ACTIONS, gamma=gamma
    )
