"""Variance-optimal baselines, exactly: what "lowest variance" does and does not mean.

Lemma 2 (``docs/theory.md#lemma-2``) lets a weighting add any shift ``c(s_t)`` of the
state; the expectation stays ``grad J`` but ``tr Cov g`` is a quadratic in ``c``.
:func:`optimal_shift` minimises it exactly over shifts tied to any grouping of the
positions: per state (``groups = tree.node_of``: the best member of the Lemma-2 family,
which is *not* Theorem 2 (28) in general) or per prompt (the best constant baseline of
REINFORCE, which is *not* ``V(w_0)`` in general). ``docs/theory.md#theorem-2`` states
when each does coincide; the tests check both the statement and a counterexample.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .specs import F64
from .tables import ExactTables, scatter_pairs

__all__ = ["optimal_shift", "score_norms", "shifted_trace"]


def _second_moment_terms(
    model: ExactTables, weights: Tensor, groups: Tensor, n_groups: int
) -> tuple[Tensor, Tensor]:
    """``(M, r)`` with ``E |g(c)|^2 = c^T M c + 2 r^T c + const`` for ``weights + c[groups]``."""
    tr = model.tree
    w = torch.as_tensor(weights, dtype=F64).masked_fill(~tr.mask, 0.0)
    a0 = scatter_pairs(w, tr.pair, tr.num_pairs)  # (N, n_pairs)
    basis = []
    for j in range(n_groups):
        on = ((groups == j) & tr.mask).to(F64)
        basis.append(scatter_pairs(on, tr.pair, tr.num_pairs))
    b = torch.stack(basis, dim=2)  # (N, n_pairs, n_groups)
    gb = torch.einsum("kl,nlj->nkj", model.gram, b)
    m = torch.einsum("n,nki,nkj->ij", model.prob, b, gb)
    r = torch.einsum("n,nk,nkj->j", model.prob, a0, gb)
    return m, r


def optimal_shift(
    model: ExactTables, weights: Tensor, groups: Tensor, n_groups: int | None = None
) -> Tensor:
    """The shift ``c`` (``(n_groups,)``) minimising ``tr Cov`` of ``weights + c[groups]``.

    Args:
        model: the exact tables.
        weights: ``(N, H)`` per-token weights (e.g. Lemma 1's ``gamma^(t-1) Q``).
        groups: ``(N, H)`` long, the group of each position (``tree.node_of``: one shift
            per state; the prompt index on every position: one baseline per prompt).
        n_groups: number of groups (default ``groups.max() + 1``).

    Returns:
        The minimiser (least-norm where ``tr Cov`` does not depend on some group, e.g.
        forced EOS states, whose score is 0). The mean ``E g`` does not depend on ``c``
        (Lemma 2), so minimising ``E |g|^2`` minimises ``tr Cov g``.
    """
    n = int(groups.max()) + 1 if n_groups is None else n_groups
    m, r = _second_moment_terms(model, weights, groups.long(), n)
    return -(torch.linalg.pinv(m, hermitian=True) @ r)


def shifted_trace(model: ExactTables, weights: Tensor, groups: Tensor, shift: Tensor) -> float:
    """``tr Cov g`` of the single-response estimator with weights ``weights + shift[groups]``."""
    w = torch.as_tensor(weights, dtype=F64) + shift.to(F64)[groups.long()]
    return model.moments_of_weights(w).trace_cov


def score_norms(model: ExactTables) -> Tensor:
    """``(n_nodes, A)`` ``|grad log pi(w | s)|^2`` of every (state, action) pair."""
    sq = model.gram.diagonal()
    return sq.view(model.tree.num_nodes, model.tree.num_actions)
