"""Ready small MDPs with exact answers, a reference policy for KL checks, a loss batch.

:func:`small_mdp` builds an :class:`~llm_mdp.theory.ExactModel` on the tree of
``docs/theory.md#the-token-mdp`` (prompt ``"a"``, actions ``{a, b, EOS}``): every response, its
probability, its reward, ``J`` and ``grad J`` exactly, in float64. Choose the policy
(tabular or a tiny transformer), the seed, gamma, and the kind of rewards:

==================  ===================  ============================================
``zra``             ``binary_rewards``   rewards
==================  ===================  ============================================
``False`` (default)  ``False``           random token rewards ``r_t ~ U(-1, 1)`` at
                                         every position, ``RM(W) = sum_t gamma^(t-1)
                                         r_t``: breaks the Zero-Reward Assumption
                                         (the paper's set-up, :func:`~llm_mdp.theory.paper_setup`)
``False``           ``True``             a process reward: 1 at the first token where a
                                         hidden coin (p = 0.35 per state and token)
                                         says so, 0 elsewhere; ``RM(W)`` is 0 or 1
``True``            ``False``            ZRA: only ``RM(W) ~ U(-1, 1)`` per response
``True``            ``True``             ZRA with ``RM(W)`` in ``{0, 1}`` (p = 0.5),
                                         like a verifier
==================  ===================  ============================================

Every reward is a deterministic function of ``(seed, prompt, prefix, token)``; the
policy is seeded with the same ``seed``.
"""

from __future__ import annotations

import copy
import random
from functools import cache
from typing import Any

import torch
from torch import Tensor

from llm_mdp.policies import TabularPolicy
from llm_mdp.tasks import char_tokenizer, hidden_rewards_task
from llm_mdp.theory import ExactModel, make_policy
from llm_mdp.theory.setups import ACTIONS, ALPHABET, EOS, A
from llm_mdp.theory.specs import F64
from llm_mdp.theory.tables import as_f64_policy, node_log_probs

__all__ = ["MDP_KINDS", "loss_batch", "reference_policy", "small_mdp"]

MDP_KINDS = ("tabular", "gpt2", "llama")
"""Policies of :func:`small_mdp`: a table of logits, a 1-layer GPT-2, a 1-layer Llama."""


PROMPTS = ("a", "b", "ab", "ba", "aa", "bb")
_PROMPT_IDS = {t: tuple(A if c == "a" else A + 1 for c in t) for t in PROMPTS}

HIT_PROBABILITY = 0.25  # binary process reward: chance that a (state, token) pays 1


def _uniform(*key: Any) -> float:
    return random.Random("|".join(map(str, key))).random()


def small_mdp(
    kind: str = "tabular",
    *,
    seed: int = 0,
    gamma: float = 1.0,
    zra: bool = False,
    binary_rewards: bool = False,
    horizon: int = 4,
    length_cap: str = "force-eos",
    init_scale: float = 1.0,
    num_prompts: int = 1,
) -> ExactModel:
    """A small token MDP with exact ``J``, ``grad J``, values, for testing estimators.

    Args:
        kind: ``"tabular"`` (one logit per state and token), ``"gpt2"`` or ``"llama"``
            (a one-layer 16-wide transformer, a few thousand parameters).
        seed: seed of the rewards and of the policy's initialisation.
        gamma: discount in ``(0, 1]``. Below 1 only with per-token rewards (``zra=False``,
            ``binary_rewards=False``): under ZRA, eq. (26) says use ``gamma = 1``.
        zra: ``True``: response-level rewards only (the Zero-Reward Assumption holds);
            ``False``: random per-token rewards (see the module docstring's table).
        binary_rewards: rewards in ``{0, 1}`` (``RM(W)`` too), e.g. a verifier.
        horizon: most tokens per response. With ``length_cap="force-eos"`` (default)
            every response ends with EOS within ``horizon`` tokens: 15 responses for 4;
            ``"env"``: the env's rule, a capped response has no EOS (31 for 4).
        init_scale: scale of the initial logits / weights (0: uniform tabular policy).
        num_prompts: prompts ``"a"``, ``"b"``, ``"ab"``, ... (up to 6), drawn uniformly;
            ``1`` is exactly :func:`~llm_mdp.theory.paper_setup`. Note: with one prompt
            and binary rewards (``zra=True``) ``J`` is one success probability, so *every*
            estimator that reads only the rewards has ``E g`` parallel to ``grad J``
            (GRPO's std normalisation included, a pure scale there); several prompts make
            the std a per-prompt learning rate, which turns the direction (slightly).

    Returns:
        An :class:`~llm_mdp.theory.ExactModel` (``.J``, ``.grad_J``, ``.tree``, ``.policy``,
        ...). Build it once per test session (the pytest fixtures do) and do not modify it.
    """
    if kind not in MDP_KINDS:
        raise ValueError(f"kind must be one of {MDP_KINDS}, got {kind!r}")
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma must be in (0, 1], got {gamma}")
    if gamma != 1.0 and (zra or binary_rewards):
        what = "zra=True" if zra else "binary_rewards=True"
        raise ValueError(
            f"gamma={gamma} needs per-token rewards (zra=False, binary_rewards=False); with "
            f"{what} RM(W) would not be sum_t gamma^(t-1) r_t (under ZRA, eq. (26): use gamma=1)"
        )
    if not 1 <= num_prompts <= len(PROMPTS):
        raise ValueError(f"num_prompts must be in 1..{len(PROMPTS)}, got {num_prompts}")
    texts = PROMPTS[:num_prompts]
    if kind == "tabular":
        policy: Any = TabularPolicy(
            len(ACTIONS),
            EOS,
            horizon,
            [_PROMPT_IDS[t] for t in texts],
            seed=seed,
            init_scale=init_scale,
        )
    else:
        policy = make_policy(kind, horizon, seed, init_scale=init_scale)
    if not zra and not binary_rewards:  # paper_setup, with more prompts
        task = hidden_rewards_task(
            alphabet="ab", max_response_tokens=horizon, gamma=gamma, prompts=texts, seed=seed
        )
        return ExactModel.from_task(
            policy, task, horizon=horizon, length_cap=length_cap, actions=ACTIONS, gamma=gamma
        )
    prompts = [_PROMPT_IDS[t] for t in texts]

    def build(**rewards: Any) -> ExactModel:
        return ExactModel.from_functions(
            policy,
            prompts,
            ACTIONS,
            EOS,
            horizon,
            length_cap=length_cap,
            tokenizer=char_tokenizer(ALPHABET),
            **rewards,
        )

    if zra:
        if binary_rewards:

            def reward(p: tuple[int, ...], response: tuple[int, ...]) -> float:
                return float(_uniform("zra-binary", seed, p, response) < 0.5)
        else:

            def reward(p: tuple[int, ...], response: tuple[int, ...]) -> float:
                return 2.0 * _uniform("zra", seed, p, response) - 1.0

        return build(reward=reward)

    @cache
    def paid_before(p: tuple[int, ...], prefix: tuple[int, ...]) -> bool:
        if not prefix:
            return False
        return paid_before(p, prefix[:-1]) or hit(p, prefix[:-1], prefix[-1])

    def hit(p: tuple[int, ...], prefix: tuple[int, ...], token: int) -> bool:
        return _uniform("process", seed, p, prefix, token) < HIT_PROBABILITY

    def token_reward(p: tuple[int, ...], prefix: tuple[int, ...], token: int) -> float:
        return float(hit(p, prefix, token) and not paid_before(p, prefix))

    return build(token_reward=token_reward)


def _perturbed(policy: Any, direction: list[Tensor | None], distance: float) -> Any:
    ref = copy.deepcopy(policy)
    with torch.no_grad():
        for p, d in zip(ref.parameters(), direction, strict=True):
            if d is not None:
                p.add_((distance * d).to(p.dtype))
    return ref


def _sequence_kl(model: ExactModel, ref: Any) -> float:
    """``KL(pi || pi_ref)`` over the responses of ``model``'s tree."""
    tree = model.tree
    ref64 = as_f64_policy(ref, F64)
    with torch.no_grad():
        table = node_log_probs(ref64, tree, next(ref64.parameters()).device).cpu()
    flat_ref, flat = table.reshape(-1), model.log_pi.reshape(-1)
    x = (flat[tree.pair] - flat_ref[tree.pair]).masked_fill(~tree.mask, 0.0)
    return float(model.prob @ x.sum(1))


def reference_policy(
    policy_or_mdp: Any,
    *,
    target_kl: float | None = 0.1,
    distance: float | None = None,
    seed: int = 1,
) -> Any:
    """A reference policy for KL checks: a copy whose weights are moved by seeded noise.

    Every trainable tensor ``p`` moves along ``rms(p) * N(0, 1)`` (``rms`` 1 for an
    all-zero tensor), times a ``distance``. Given an :class:`~llm_mdp.theory.ExactModel`
    and no ``distance``, the distance is searched (bisection) so that the exact
    ``KL(pi || pi_ref)`` is within 20% of ``target_kl``: the same call gives a comparable
    reference for tabular and transformer policies. Given a bare policy, ``distance``
    defaults to 0.5.
    """
    model = policy_or_mdp if isinstance(policy_or_mdp, ExactModel) else None
    policy = model.policy if model is not None else policy_or_mdp
    gen = torch.Generator().manual_seed(seed)
    direction: list[Tensor | None] = []
    for p in policy.parameters():
        if not (p.requires_grad and p.is_floating_point()):
            direction.append(None)
            continue
        rms = float(p.detach().double().pow(2).mean().sqrt()) if p.numel() else 0.0
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        direction.append((rms if rms > 0 else 1.0) * noise)
    if distance is not None or model is None or target_kl is None:
        return _perturbed(policy, direction, 0.5 if distance is None else distance)
    if target_kl <= 0:
        raise ValueError(f"target_kl must be > 0, got {target_kl}")
    lo, hi = 0.0, 0.5
    while _sequence_kl(model, _perturbed(policy, direction, hi)) < target_kl and hi < 64:
        lo, hi = hi, 2 * hi
    for _ in range(40):
        mid = (lo + hi) / 2
        ref = _perturbed(policy, direction, mid)
        kl = _sequence_kl(model, ref)
        if abs(kl / target_kl - 1) <= 0.2:
            return ref
        lo, hi = (mid, hi) if kl < target_kl else (lo, mid)
    return _perturbed(policy, direction, hi)


def loss_batch(
    batch_size: int = 8,
    length: int = 6,
    *,
    group_size: int = 1,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    pad_value: float = 0.0,
) -> dict[str, Tensor]:
    """A random right-padded batch for loss tests (:func:`assert_partition_invariant`).

    Keys: ``logp`` (``(B, R)`` leaf with ``requires_grad``), ``old_logp``, ``ref_logp``,
    ``advantages`` (``(B, R)``), ``rewards`` (``(B,)``), ``mask`` (``(B, R)`` bool, lengths
    from 1 to ``length``, not all equal). Rows come in contiguous groups of ``group_size``.
    Padding holds ``pad_value`` in every ``(B, R)`` float tensor; ``float("nan")`` makes a
    loss that reads padding (``x * mask`` instead of ``torch.where(mask, x, 0)``) show it.
    """
    if batch_size < 2 or batch_size % group_size:
        raise ValueError(
            f"batch_size must be >= 2 and a multiple of group_size; got {batch_size}, {group_size}"
        )
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (batch_size,), generator=gen)
    lengths[0], lengths[-1] = 1, length  # never all equal
    mask = torch.arange(length)[None, :] < lengths[:, None]

    def tokens(scale: float, shift: float = 0.0) -> Tensor:
        x = shift + scale * torch.randn(batch_size, length, generator=gen, dtype=dtype)
        return x.masked_fill(~mask, pad_value)

    old = tokens(0.5, -1.2)
    logp = (old + tokens(0.1)).detach().requires_grad_(True)
    rewards = torch.rand(batch_size, generator=gen, dtype=dtype)
    return {
        "logp": logp,
        "old_logp": old,
        "ref_logp": tokens(0.5, -1.2),
        "advantages": tokens(1.0),
        "rewards": rewards,
        "mask": mask,
    }
