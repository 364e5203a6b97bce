"""Unit-test your own policy-gradient estimator, KL estimator and loss exactly (copy this file).

A test file for *your* test suite. On a small token MDP every response is enumerated, so
the expected gradient of an estimator is computed exactly and compared with the true
grad J: "unbiased" means equal to ~1e-15, not "within noise". The fixtures
(``exact_mdp``, ``transformer_mdp``, ``random_loss_batch``, ...) come from llm-mdp's pytest
plugin, installed with the package: no conftest.py needed. Guide: docs/testing.md.

    python -m pytest examples/06_test_your_estimator.py -q   # as a test file
    python examples/06_test_your_estimator.py                # the same, through pytest.main

One estimator passes; one with a planted bug (a group-mean baseline that includes the
sample itself) fails with a message naming the (G-1)/G scaling, caught here with
``pytest.raises`` so that this file passes, and printed (run as a script, or with ``-s``).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

from llm_mdp.estimators import AdvantageInputs, aggregate, ppo_clip
from llm_mdp.testing import (
    assert_biased,
    assert_kl_estimator,
    assert_partition_invariant,
    assert_unbiased,
    gradient_report,
)

G = 4  # responses per prompt


# ---- your functions, as they would sit in your trainer ------------------------------------


def my_rloo(batch: AdvantageInputs) -> torch.Tensor:
    """Leave-one-out baseline: R_i - mean_{j != i} R_j on every token of response i."""
    r = batch.rewards.view(-1, batch.group_size)
    baseline = (r.sum(1, keepdim=True) - r) / (batch.group_size - 1)
    return (r - baseline).reshape(-1, 1) * batch.mask


def my_buggy_baseline(batch: AdvantageInputs) -> torch.Tensor:
    """Planted bug: the group mean includes the sample itself."""
    r = batch.rewards.view(-1, batch.group_size)
    return (r - r.mean(1, keepdim=True)).reshape(-1, 1) * batch.mask


def my_k3(logp: torch.Tensor, ref_logp: torch.Tensor, mask=None) -> torch.Tensor:
    """k3 = pi_ref/pi - 1 - log(pi_ref/pi), an unbiased estimate of KL(pi || pi_ref)."""
    log_rho = ref_logp.detach() - logp
    k = torch.exp(log_rho) - 1 - log_rho
    return k if mask is None else torch.where(mask.bool(), k, torch.zeros_like(k))


def my_loss(micro_batch: dict, counts: dict) -> torch.Tensor:
    """PPO-clip surrogate, token-mean over the *whole* batch's tokens (counts)."""
    out = ppo_clip(
        micro_batch["logp"], micro_batch["old_logp"], micro_batch["advantages"], micro_batch["mask"]
    )
    return aggregate(out.loss, micro_batch["mask"], "token-mean", **counts)


# ---- the tests ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "exact_mdp",
    ["tabular", "gpt2", {"kind": "tabular", "zra": True, "binary_rewards": True}],
    indirect=True,
)
def test_my_rloo_is_unbiased(exact_mdp):
    assert_unbiased(my_rloo, exact_mdp, group_size=G)


def test_the_planted_bias_is_caught_and_explained(exact_mdp):
    with pytest.raises(AssertionError, match=r"looks like a \(G-1\)/G = 0\.75 scaling") as caught:
        assert_unbiased(my_buggy_baseline, exact_mdp, group_size=G)
    print(f"\nassert_unbiased(my_buggy_baseline) failed as it should:\n{caught.value}")
    # once understood, pin the bias so that a change of it shows up
    assert_biased(my_buggy_baseline, exact_mdp, group_size=G, expected_scale=(G - 1) / G)


def test_bias_and_variance_in_numbers(exact_mdp):
    # bias, cosine, projection ratio and variance (trace of the covariance of a draw)
    small, large = (gradient_report(my_rloo, exact_mdp, group_size=g) for g in (2, G))
    assert large.relative_error < 1e-12 and large.cosine == pytest.approx(1.0)
    # a larger group gives a better leave-one-out baseline: less variance per response
    assert large.trace_cov_per_response < small.trace_cov_per_response
    print(large)


def test_my_k3_estimates_the_reverse_kl(transformer_mdp):
    assert_kl_estimator(my_k3, transformer_mdp, value="exact")
    # in the loss (GRPO's placement) its gradient is not grad KL: pin that too
    assert_kl_estimator(my_k3, transformer_mdp, placement="loss", gradient="biased")


def test_my_loss_does_not_depend_on_micro_batching(random_loss_batch):
    assert_partition_invariant(my_loss, random_loss_batch, group_size=2)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # (this script imported torch & co. before pytest starts: silence pytest's note on that)
    quiet = ["-W", "ignore::pytest.PytestAssertRewriteWarning", "-p", "no:cacheprovider"]
    # -s: show what the tests print (the planted bug's HINT, the numbers of the report)
    sys.exit(pytest.main([__file__, "-q", "-s", *quiet, *sys.argv[1:]]))
