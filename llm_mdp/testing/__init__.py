"""Test your own policy-gradient estimator, KL estimator or loss exactly, like ``torch.testing``.

On a small token MDP every response is enumerated, so ``J``, ``grad J`` and the exact
mean and variance of an estimator's gradient are known in float64. The assertions
compare your function with them and explain a failure (which coordinate, how far, the
exact value against the estimate, and a HINT). The pytest plugin
(:mod:`llm_mdp.testing.plugin`, registered as ``pytest11``) offers the MDPs as fixtures.
Guide: ``docs/testing.md``.

What you pass
-------------
The functions have the signatures of the registries in :mod:`llm_mdp.estimators`, which
documents them once (module docstring, "Registries and their one signature each"; the
fields of the batch: :class:`~llm_mdp.estimators.AdvantageInputs`):

* an advantage estimator ``fn(batch: AdvantageInputs, **options) -> Tensor (B, R)``, the
  weight of ``grad log pi(w_t | s_t)`` per token, 0 on padding; groups of ``G`` rows are
  contiguous (``batch.group_size``). A registry name works too.
* a KL estimator ``fn(logp, ref_logp, mask=None) -> Tensor (B, R)``, differentiable in ``logp``.
* a loss ``loss_fn(micro_batch: dict[str, Tensor], counts: dict[str, float]) -> scalar``
  (:data:`~llm_mdp.testing.partition.LossFn`), the shape of ``Agent.loss``.

API
---
* :func:`small_mdp` (tabular / tiny GPT-2 / tiny Llama; per-token or ZRA rewards, binary
  or real, any seed and gamma), :func:`reference_policy`, :func:`loss_batch`.
* :func:`gradient_report` -> :class:`GradientReport` (bias, cosine, projection ratio,
  variance); :func:`assert_unbiased`; :func:`assert_biased` (``expected_scale=``,
  ``cosine=(lo, hi)``).
* :func:`kl_report`, :func:`assert_kl_estimator` (``value="exact"|"second-order"``,
  ``placement=``, ``gradient=``).
* :func:`assert_partition_invariant` (micro-batches with global counts).
* Off-policy (``behavior=``): :func:`offpolicy_report`, :func:`assert_unbiased_offpolicy`,
  :func:`assert_biased_offpolicy`; clipping: :func:`assert_clipped_surrogate`.
"""

from llm_mdp.estimators import AdvantageInputs
from llm_mdp.theory import ALL_EXACT, ExactModel, InputSpec

from .gradients import (
    AdvantageEstimator,
    GradientReport,
    assert_biased,
    assert_unbiased,
    gradient_report,
)
from .kl import KLEstimator, KLReport, assert_kl_estimator, kl_report
from .mdps import MDP_KINDS, loss_batch, reference_policy, small_mdp
from .offpolicy import (
    assert_biased_offpolicy,
    assert_clipped_surrogate,
    assert_unbiased_offpolicy,
    offpolicy_report,
)
from .partition import LossFn, assert_partition_invariant, batch_counts

__all__ = [
    "ALL_EXACT",
    "MDP_KINDS",
    "AdvantageEstimator",
    "AdvantageInputs",
    "ExactModel",
    "GradientReport",
    "InputSpec",
    "KLEstimator",
    "KLReport",
    "LossFn",
    "assert_biased",
    "assert_biased_offpolicy",
    "assert_clipped_surrogate",
    "assert_kl_estimator",
    "assert_partition_invariant",
    "assert_unbiased",
    "assert_unbiased_offpolicy",
    "batch_counts",
    "gradient_report",
    "kl_report",
    "loss_batch",
    "offpolicy_report",
    "reference_policy",
    "small_mdp",
]
