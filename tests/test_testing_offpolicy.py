"""The testing API catches clipping bugs and checks importance-weighted estimators (behavior=)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from llm_mdp import estimators as est
from llm_mdp.estimators import PolicyLossOutput
from llm_mdp.testing import (
    assert_biased_offpolicy,
    assert_clipped_surrogate,
    assert_partition_invariant,
    assert_unbiased_offpolicy,
    loss_batch,
    offpolicy_report,
    small_mdp,
)


def swapped_clip(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float | None = None,
) -> PolicyLossOutput:
    """PPO with min and max swapped: passes every other check."""
    high = clip_low if clip_high is None else clip_high
    ratio = torch.exp(logp - old_logp.detach())
    loss = torch.minimum(-advantages * ratio, -advantages * ratio.clamp(1 - clip_low, 1 + high))
    return PolicyLossOutput(torch.where(mask, loss, 0.0), {})


def test_clipped_surrogate_check_passes_ppo_clip_and_clip_higher() -> None:
    assert_clipped_surrogate("ppo_clip")
    assert_clipped_surrogate("ppo_clip", clip_low=0.2, clip_high=0.28)  # DAPO's clip-higher


def test_swapped_clip_passes_partition_invariance_but_is_caught_with_a_clipping_hint() -> None:
    def loss(mb: dict[str, Tensor], counts: dict[str, float]) -> Tensor:
        out = swapped_clip(mb["logp"], mb["old_logp"], mb["advantages"], mb["mask"])
        return est.aggregate(out.loss, mb["mask"], "token-mean", **counts)

    assert_partition_invariant(loss, loss_batch())  # the old checks cannot see it
    with pytest.raises(AssertionError) as err:
        assert_clipped_surrogate(swapped_clip)
    msg = str(err.value)
    assert "HINT: clipping" in msg and "min and max swapped" in msg, msg


def test_unclipped_and_clamp_only_surrogates_are_named() -> None:
    with pytest.raises(AssertionError, match="HINT: clipping: the loss never clips"):
        assert_clipped_surrogate("vanilla", options={})

    def clamp_only(logp: Tensor, old: Tensor, adv: Tensor, mask: Tensor, **kw: float) -> Tensor:
        ratio = torch.exp(logp - old).clamp(0.8, 1.2)
        return torch.where(mask, -adv * ratio, 0.0)

    with pytest.raises(AssertionError, match="without the max with -A r"):
        assert_clipped_surrogate(clamp_only, options={})


def test_offpolicy_assertions_with_behavior() -> None:
    mdp = small_mdp()
    assert_unbiased_offpolicy(mdp=mdp, behavior="temperature=0.7", correction="seq_tis")
    rep = assert_biased_offpolicy(mdp=mdp, behavior="temperature=0.7", correction="tis")
    assert rep.relative_error > 1e-3
    with pytest.raises(AssertionError) as err:
        assert_unbiased_offpolicy(mdp=mdp, behavior="top_p=0.8", correction="seq_tis")
    assert "irreducible" in str(err.value)
    with pytest.raises(AssertionError, match="token-level ratios"):
        assert_unbiased_offpolicy(mdp=mdp, behavior={"kind": "perturbed"}, correction="tis")

    def my_sequence_is(logp: Tensor, behavior_logp: Tensor, mask: Tensor, **kw: object) -> Tensor:
        log_rho = torch.where(mask, logp - behavior_logp, 0.0).sum(1, keepdim=True)
        return torch.where(mask, log_rho.exp().expand_as(logp), 0.0)

    rep = assert_unbiased_offpolicy(mdp=mdp, behavior="temperature=1.4", correction=my_sequence_is)
    assert rep.relative_error < 1e-10
    on = offpolicy_report("rloo", mdp, behavior="on-policy", group_size=2)
    assert on.relative_error < 1e-12
