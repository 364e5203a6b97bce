"""Theory weightings: per-token weights computed from the exact tables (not registry estimators).

Each is a function of an :class:`~llm_mdp.theory.tables.ExactTables` returning ``(N, H)``
weights ``A_t`` of ``grad log pi(w_t | s_t)``; ``docs/theory.md`` states the result each
one checks (Lemma 1 (4), Lemma 2, Theorem 1 (21), Theorem 2 (28), eq. (26)).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .specs import F64
from .tables import ExactTables

__all__ = ["THEORY_WEIGHTINGS"]


def _positions(model: ExactTables) -> Tensor:
    return model.discounts[None, :].expand(model.tree.num_responses, -1)


def _lemma1(model: ExactTables) -> Tensor:
    """Lemma 1 (4): ``gamma^(t-1) Q(s_t, w_t)``."""
    tr = model.tree
    return _positions(model) * model.Q.reshape(-1)[tr.pair]


def _lemma2(model: ExactTables, seed: int = 0, scale: float = 1.0) -> Tensor:
    """Lemma 2: ``gamma^(t-1) Q(s_t, w_t) + c(s_t)``, ``c ~ scale * N(0, 1)`` per node (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    c = scale * torch.randn(model.tree.num_nodes, generator=gen, dtype=F64)
    return _lemma1(model) + c[model.tree.node_of]


def _theorem1(model: ExactTables) -> Tensor:
    """Theorem 1 (21): ``E[RM(W^(t+1))] = U(s_{t+1})``, the expected reward of a completion
    sharing ``w_0 .. w_t`` (its single-sample version, ``RM(W)``, is ``reinforce``)."""
    return model.prefix_values[:, 1:]


def _theorem2(model: ExactTables) -> Tensor:
    """Theorem 2 (28): ``U(s_{t+1}) - U(s_t) = gamma^(t-1) (Q - V)``."""
    return model.prefix_values[:, 1:] - model.prefix_values[:, :-1]


def _reinforce(model: ExactTables, baseline: bool = False) -> Tensor:
    """``RM(W)`` on every token, minus ``V(prompt)`` with ``baseline=True``."""
    b = model.prompt_value[model.tree.resp_prompt] if baseline else 0.0
    return (model.rewards - b)[:, None].expand(-1, model.tree.horizon).clone()


def _eq26(model: ExactTables) -> Tensor:
    """(26): ZRA rewards with discount gamma: return-to-go ``gamma^(T-t) RM(W)``."""
    t = torch.arange(model.tree.horizon)[None, :]
    expo = (model.tree.lengths[:, None] - 1 - t).clamp(min=0).to(F64)
    return model.gamma**expo * model.rewards[:, None]


THEORY_WEIGHTINGS: dict[str, Callable[..., Tensor]] = {
    "lemma1": _lemma1,
    "lemma2": _lemma2,
    "theorem1": _theorem1,
    "theorem2": _theorem2,
    "reinforce": _reinforce,
    "eq26": _eq26,
}
"""Per-token weightings computed from the exact tables (not registry estimators)."""
