"""Ready-made exact set-ups, with a tabular or a tiny transformer policy.

* :func:`paper_setup`: the small set-up of ``docs/theory.md#the-token-mdp``;
* :func:`echo_setup`: a two-turn tree with a random environment reply
  (``docs/theory.md#multi-turn``).
"""

from __future__ import annotations

from typing import Any

from llm_mdp.policies import CausalLMPolicy, TabularPolicy, tiny_gpt2, tiny_llama
from llm_mdp.tasks import ResponseBatch, Task, Turn, char_tokenizer, hidden_rewards_task
from llm_mdp.tasks.turns import ReplyOutcomes

from .moments import ExactModel

__all__ = ["POLICY_KINDS", "SETUPS", "echo_setup", "echo_task", "make_policy", "paper_setup"]

POLICY_KINDS = ("tabular", "gpt2", "llama")
SETUPS = ("paper", "echo")
"""The set-ups :func:`~llm_mdp.theory.report.verify` can build: :func:`paper_setup`,
:func:`echo_setup`."""

PROMPT = "a"
ALPHABET = "ab"
# char_tokenizer("ab"): 0 = <eos> (also the pad token), 1 = 'a', 2 = 'b': every id is an action.
EOS, A, B = 0, 1, 2
ACTIONS = (EOS, A, B)


def make_policy(
    kind: str, horizon: int, seed: int, *, init_scale: float = 1.0, multi_turn: bool = False
) -> Any:
    """A policy over the 3-token char vocabulary of :func:`paper_setup` and :func:`echo_setup`.

    ``"tabular"``: :class:`TabularPolicy` with ``N(0, init_scale^2)`` logits (a row for
    every prefix, EOS included, with ``multi_turn``). ``"gpt2"`` /
    ``"llama"``: a one-layer 16-wide :class:`CausalLMPolicy` (a few thousand parameters),
    initialised with std ``0.5 * init_scale`` so that its policy is far from uniform.
    """
    if kind == "tabular":
        return TabularPolicy(
            len(ACTIONS),
            EOS,
            horizon,
            [(A,)],
            seed=seed,
            init_scale=init_scale,
            multi_turn=multi_turn,
        )
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


def echo_task(p: float = 0.7, horizon: int = 5) -> Task:
    """Two turns over ``{a, b, EOS}``: the environment answers, the policy must echo it.

    Prompt ``"a"``. The policy's first turn is any string it ends with EOS; the
    environment replies ``"a"`` with probability ``p`` and ``"b"`` with ``1 - p`` (a chance
    node) and the policy takes its second, last turn (``max_turns=2``). ``RM(W) = 1`` when
    the second turn is exactly the reply (``"a"`` + EOS after ``"a"``), else 0, also when
    the length cap ``horizon`` (replies included) cuts the conversation. The optimum is
    ``J* = 1`` (end the first turn at once, then echo: 4 tokens). The uniform policy
    echoes after a first turn of ``k <= horizon - 4`` characters, so its
    ``J = (1/9) (1 - (2/3)^(horizon - 3))``, ``5/81`` at ``horizon=5``, whatever ``p``.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    if horizon < 4:
        raise ValueError(f"horizon must be >= 4 (EOS, reply, echo, EOS), got {horizon}")
    tok = char_tokenizer(ALPHABET)

    def reply_fn(turn: Turn) -> ReplyOutcomes | None:
        if turn.turn > 1:
            return None
        return ((p, (A,)), (1.0 - p, (B,)))

    def reward_fn(batch: ResponseBatch) -> list[float]:
        if batch.policy_mask is None:
            raise ValueError("echo_task scores multi-turn responses: give policy_mask")
        out = []
        masks = batch.policy_mask.bool().tolist()
        for ids, mine in zip(batch.response_token_lists(), masks, strict=False):
            env = [t for t, m in zip(ids, mine, strict=False) if not m]
            first_eos = ids.index(EOS) if EOS in ids else len(ids)
            second = ids[first_eos + 1 + len(env) :]
            out.append(float(len(env) == 1 and second == [*env, EOS]))
        return out

    return Task(
        name="echo",
        prompts=(PROMPT,),
        reward_fn=reward_fn,
        tokenizer=tok,
        max_response_tokens=horizon,
        optimal_reward=1.0,
        description="two turns: the environment says a or b at random, the policy echoes it",
        reply_fn=reply_fn,
        max_turns=2,
    )


def echo_setup(
    *,
    p: float = 0.7,
    horizon: int = 5,
    length_cap: str = "env",
    seed: int = 0,
    policy: str | Any = "tabular",
    init_scale: float = 1.0,
) -> ExactModel:
    """The exact model of :func:`echo_task`, a multi-turn tree.

    With ``horizon=5`` and ``length_cap="env"``: 65 decision nodes, 15 chance nodes and
    146 responses; ``J* = 1`` and ``J = 5/81`` for the uniform policy (``init_scale=0``).
    ``policy`` is a kind from :data:`POLICY_KINDS` (the tabular one with a row for every
    prefix) or a policy object over the same vocabulary.
    """
    task = echo_task(p, horizon)
    pol = (
        make_policy(policy, horizon, seed, init_scale=init_scale, multi_turn=True)
        if isinstance(policy, str)
        else policy
    )
    return ExactModel.from_task(pol, task, horizon=horizon, length_cap=length_cap, actions=ACTIONS)
