"""Exact theory toolkit: enumerate a small policy's responses and check estimators exactly.

* :func:`enumerate_tree` / :class:`ResponseTree`: every node and response (length-cap
  conventions ``"env"`` and ``"force-eos"``; multi-turn trees with chance nodes where the
  environment replies).
* :class:`ExactModel`: exact ``J``, ``grad J`` (autograd over the enumeration), ``V``,
  ``Q``, and the exact mean and covariance of any estimator's gradient; registry
  estimators by name (:class:`EstimatorSpec`), theory weightings by name
  (:data:`THEORY_WEIGHTINGS`).
* :class:`KLModel`, :func:`kl_rows`: exact KL to a reference and each KL estimator.
* :func:`paper_setup`: the small set-up of ``docs/theory.md#eq-26`` (tabular, tiny GPT-2 or
  tiny Llama policy); :func:`echo_setup`: a two-turn tree with a random environment reply
  (``docs/theory.md#multi-turn``).
* :func:`verify`, :func:`print_report`, :func:`plot_bias_variance`, :func:`verify_cli`.
"""

from .display import format_report, plot_bias_variance, print_report, verify_cli
from .kl import KL_PLACEMENTS, KLModel, KLRow, kl_rows
from .moments import ExactModel
from .report import (
    EstimatorRow,
    IdentityRow,
    SetupInfo,
    VerifyReport,
    estimator_row,
    identity_rows,
    standard_specs,
    verify,
)
from .setups import POLICY_KINDS, SETUPS, echo_setup, echo_task, make_policy, paper_setup
from .specs import ALL_EXACT, Comparison, EstimatorSpec, GradientMoments, InputSpec, compare
from .tree import LENGTH_CAPS, ResponseTree, enumerate_tree
from .weightings import THEORY_WEIGHTINGS

__all__ = [
    "ALL_EXACT",
    "KL_PLACEMENTS",
    "LENGTH_CAPS",
    "POLICY_KINDS",
    "SETUPS",
    "THEORY_WEIGHTINGS",
    "Comparison",
    "EstimatorRow",
    "EstimatorSpec",
    "ExactModel",
    "GradientMoments",
    "IdentityRow",
    "InputSpec",
    "KLModel",
    "KLRow",
    "ResponseTree",
    "SetupInfo",
    "VerifyReport",
    "compare",
    "echo_setup",
    "echo_task",
    "enumerate_tree",
    "estimator_row",
    "format_report",
    "identity_rows",
    "kl_rows",
    "make_policy",
    "paper_setup",
    "plot_bias_variance",
    "print_report",
    "standard_specs",
    "verify",
    "verify_cli",
]
