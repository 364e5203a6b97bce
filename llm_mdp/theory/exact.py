"""The exact toolkit's model, by its historical import path.

The toolkit is split by concern: :mod:`~llm_mdp.theory.specs` (what is evaluated),
:mod:`~llm_mdp.theory.tables` (``P(W)``, ``J``, ``grad J``, ``V``, ``Q``, scores),
:mod:`~llm_mdp.theory.moments` (enumeration, Monte Carlo and TRePO closed forms:
:class:`ExactModel`) and :mod:`~llm_mdp.theory.weightings` (Lemma 1, Lemma 2,
Theorem 1 and 2, eq. (26)). This module re-exports their public names.
"""

from .moments import ExactModel
from .specs import (
    ALL_EXACT,
    F64,
    Comparison,
    EstimatorSpec,
    GradientMoments,
    InputSpec,
    ResponseRewardFn,
    TokenRewardFn,
    compare,
)
from .tables import ExactTables
from .weightings import THEORY_WEIGHTINGS

__all__ = [
    "ALL_EXACT",
    "F64",
    "THEORY_WEIGHTINGS",
    "Comparison",
    "EstimatorSpec",
    "ExactModel",
    "ExactTables",
    "GradientMoments",
    "InputSpec",
    "ResponseRewardFn",
    "TokenRewardFn",
    "compare",
]
