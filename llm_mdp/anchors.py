"""TRePO's anchor plan: which prefix values to estimate, and where each estimate goes.

One source for :class:`~llm_mdp.agents.trepo.TRePO` (which rolls the plan out with the
policy) and the exact toolkit (:mod:`llm_mdp.theory.moments`, which enumerates every
anchor set and puts the exact mean and variance into the same slots), so the exact check
covers the code that trains. The reconstructed options are in ``docs/theory.md#trepo``.

Columns: a row of length ``T`` has ``C = L + 1`` prefix columns (``L`` = padded response
length); column ``c`` is the state ``s_{c+1}``, the prompt plus ``c`` response tokens, so
column 0 is ``V_hat(s_1)`` and column ``T`` the terminal value ``RM(W)``, never estimated.
An anchor is a position ``t`` in ``1..T`` (column ``t - 1`` of the ``(B, L)`` anchor mask).
For the anchor ``t`` the plan estimates ``V(s_t)`` (column ``t - 1``) and, with
``columns="pair"``, ``V(s_{t+1})`` (column ``t``, unless it is terminal).

Estimates come in two slots per column:

* ``first``: the estimate of the column's value that fills ``prefix_values``. Column 0
  always has one (the agent uses the leave-one-out mean of the group, the theory
  ``root_rollouts`` completions).
* ``second``: with ``value_estimates="fresh"``, the ``V(s_{t+1})`` of an anchor ``t``
  gets its own, independent completions, passed as the trepo estimator's ``next_values``
  (so the two terms of ``A_t`` are independent). With ``"shared"`` there are none.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ANCHOR_COLUMNS", "VALUE_ESTIMATES", "AnchorPlan", "anchor_plan", "place_estimates"]

ANCHOR_COLUMNS = ("pair", "state")
"""``"pair"``: an anchor ``t`` estimates ``V(s_t)`` and ``V(s_{t+1})``; ``"state"``: ``V(s_t)``."""
VALUE_ESTIMATES = ("shared", "fresh")
"""``"shared"``: one estimate per prefix; ``"fresh"``: ``V(s_{t+1})`` of an anchor on its own."""


@dataclass(frozen=True)
class AnchorPlan:
    """Which prefix values a batch estimates.

    Attributes:
        first: ``(B, C)`` bool, columns with a first estimate (column 0 in every row).
        second: ``(B, C)`` bool, columns with a second, independent estimate (``"fresh"``).
        after: ``(B, C)`` bool, columns that are the ``s_{t+1}`` of an anchor ``t``.
        known: ``(B, C)`` bool, columns with any estimate: the trepo ``prefix_known``.
        fresh: the plan has second estimates (``value_estimates="fresh"``).
    """

    first: Tensor
    second: Tensor
    after: Tensor
    known: Tensor
    fresh: bool

    def jobs(self, *, root: bool = False) -> list[tuple[int, int, int]]:
        """``(row, column, slot)`` of every estimate to roll out, slot 0 (first) then 1.

        ``root=False`` leaves out column 0 (the agent estimates ``V_hat(s_1)`` from the
        group, not by rollouts). Sorted by row then column within each slot.
        """
        first = self.first.clone()
        if not root:
            first[:, 0] = False
        out = [(int(i), int(c), 0) for i, c in first.nonzero().tolist()]
        return out + [(int(i), int(c), 1) for i, c in self.second.nonzero().tolist()]


def anchor_plan(
    lengths: Tensor,
    anchors: Tensor,
    *,
    columns: str = "pair",
    value_estimates: str = "shared",
) -> AnchorPlan:
    """The estimate slots of rows with response ``lengths`` and anchor positions ``anchors``.

    Args:
        lengths: ``(B,)`` response lengths ``T >= 1``.
        anchors: ``(B, L)`` bool, position ``t`` at column ``t - 1``; positions past ``T``
            are ignored.
        columns: ``"pair"`` or ``"state"`` (:data:`ANCHOR_COLUMNS`).
        value_estimates: ``"shared"`` or ``"fresh"`` (:data:`VALUE_ESTIMATES`).

    Returns:
        The :class:`AnchorPlan`, masks of shape ``(B, L + 1)``.
    """
    if columns not in ANCHOR_COLUMNS:
        raise ValueError(f"columns must be one of {ANCHOR_COLUMNS}, got {columns!r}")
    if value_estimates not in VALUE_ESTIMATES:
        raise ValueError(
            f"value_estimates must be one of {VALUE_ESTIMATES}, got {value_estimates!r}"
        )
    if anchors.dim() != 2 or lengths.shape != (anchors.shape[0],):
        raise ValueError(
            f"anchors must be (B, L) and lengths (B,); got {tuple(anchors.shape)} "
            f"and {tuple(lengths.shape)}"
        )
    b, width = anchors.shape
    dev = anchors.device
    inside = torch.arange(width + 1, device=dev)[None, :] < lengths.to(dev)[:, None]
    before = torch.zeros(b, width + 1, dtype=torch.bool, device=dev)
    before[:, :width] = anchors.bool()
    before[:, 0] = True
    after = torch.zeros_like(before)
    if columns == "pair":
        after[:, 1:] = anchors.bool()
    before &= inside
    after &= inside
    known = before | after
    fresh = value_estimates == "fresh"
    return AnchorPlan(
        first=before if fresh else known,
        second=after if fresh else torch.zeros_like(after),
        after=after,
        known=known,
        fresh=fresh,
    )


def place_estimates(
    plan: AnchorPlan, first: Tensor, second: Tensor
) -> tuple[Tensor, Tensor | None]:
    """The trepo estimator's ``prefix_values`` and ``next_values`` from slot estimates.

    Args:
        plan: the :class:`AnchorPlan`.
        first: ``(B, C)`` estimates at ``plan.first`` (anything elsewhere).
        second: ``(B, C)`` estimates at ``plan.second`` (anything elsewhere).

    Returns:
        ``prefix_values`` ``(B, C)``: the first estimate, or the second where a column has
        only that one (0 where unknown); ``next_values`` ``(B, C - 1)`` (``None`` unless
        fresh): at column ``t - 1`` the fresh ``V_hat(s_{t+1})`` of an anchor ``t``, the
        shared prefix estimate elsewhere (trepo reads it wherever ``s_t`` and ``s_{t+1}``
        are both known).
    """
    zero = torch.zeros((), dtype=first.dtype, device=first.device)
    prefix = torch.where(plan.first, first, zero)
    if not plan.fresh:
        return prefix, None
    prefix = torch.where(plan.second & ~plan.first, second, prefix)
    nxt = torch.where(plan.after[:, 1:], second[:, 1:], prefix[:, 1:])
    return prefix, nxt
