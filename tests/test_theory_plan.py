"""TRePO's anchor plan (one source for the agent and the exact toolkit) and PPO's whitening."""

from __future__ import annotations

import pytest
import torch

from llm_mdp import estimators as est
from llm_mdp.anchors import anchor_plan, place_estimates


def _mask(rows: list[list[int]], width: int) -> torch.Tensor:
    out = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, positions in enumerate(rows):
        out[i, [t - 1 for t in positions]] = True
    return out


def test_anchor_plan_shared_pairs() -> None:
    # T = 4 with anchors t = 2, 4; T = 2 with anchor t = 2 (its s_3 is terminal)
    plan = anchor_plan(torch.tensor([4, 2]), _mask([[2, 4], [2]], 4))
    # anchor t estimates columns t - 1 (s_t) and t (s_{t+1}) unless terminal; column 0 always
    assert plan.known.tolist() == [
        [True, True, True, True, False],
        [True, True, False, False, False],
    ]
    assert torch.equal(plan.first, plan.known) and not plan.second.any() and not plan.fresh
    assert plan.jobs() == [(0, 1, 0), (0, 2, 0), (0, 3, 0), (1, 1, 0)]
    assert plan.jobs(root=True)[:1] == [(0, 0, 0)]
    first = torch.arange(10.0).view(2, 5)
    prefix, nxt = place_estimates(plan, first, torch.full((2, 5), -1.0))
    assert nxt is None
    assert prefix.tolist() == [[0.0, 1.0, 2.0, 3.0, 0.0], [5.0, 6.0, 0.0, 0.0, 0.0]]


def test_anchor_plan_fresh_second_estimates() -> None:
    plan = anchor_plan(torch.tensor([4]), _mask([[2]], 4), value_estimates="fresh")
    assert plan.first.tolist() == [[True, True, False, False, False]]  # s_1 and s_2
    assert plan.second.tolist() == [[False, False, True, False, False]]  # s_3, fresh
    assert plan.jobs() == [(0, 1, 0), (0, 2, 1)]
    first = torch.tensor([[10.0, 11.0, 12.0, 13.0, 14.0]])
    second = torch.tensor([[20.0, 21.0, 22.0, 23.0, 24.0]])
    prefix, nxt = place_estimates(plan, first, second)
    assert prefix.tolist() == [[10.0, 11.0, 22.0, 0.0, 0.0]]  # s_3 has only its fresh one
    assert nxt is not None
    # next_values[t - 1] = V_hat(s_{t+1}): fresh at the anchor t = 2, shared elsewhere
    assert nxt.tolist() == [[11.0, 22.0, 0.0, 0.0]]


def test_anchor_plan_state_columns_and_errors() -> None:
    plan = anchor_plan(torch.tensor([3]), _mask([[2]], 3), columns="state")
    assert plan.known.tolist() == [[True, True, False, False]]
    with pytest.raises(ValueError, match="columns must be one of"):
        anchor_plan(torch.tensor([3]), _mask([[2]], 3), columns="both")
    with pytest.raises(ValueError, match="value_estimates must be one of"):
        anchor_plan(torch.tensor([3]), _mask([[2]], 3), value_estimates="new")
    with pytest.raises(ValueError, match=r"anchors must be \(B, L\)"):
        anchor_plan(torch.tensor([3, 3]), _mask([[2]], 3))


def test_whiten_is_registered_and_matches_hand_values() -> None:
    adv = torch.tensor([[1.0, 2.0, 99.0], [3.0, 4.0, 5.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    out = est.get_advantage_transform("whiten")(adv, mask)
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)
    expected = (x - 3.0) / (x.std() + 1e-8)  # unbiased std = sqrt(2.5)
    torch.testing.assert_close(out[mask.bool()], expected.float())
    assert out[0, 2] == 0.0 and out.dtype == adv.dtype


def test_whiten_over_ranks_equals_whole_batch() -> None:
    """Two halves with a summing all_reduce give the whole batch's statistics."""
    gen = torch.Generator().manual_seed(0)
    adv = torch.randn(6, 5, generator=gen)
    mask = torch.rand(6, 5, generator=gen) > 0.3
    whole = est.whiten(adv, mask)
    halves = [(adv[:3], mask[:3]), (adv[3:], mask[3:])]

    def stats(a: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        x = a[m].double()
        return torch.stack([x.sum(), (x * x).sum(), torch.tensor(float(x.numel()))])

    total = stats(*halves[0]) + stats(*halves[1])
    parts = [est.whiten(a, m, all_reduce=lambda _s: total.clone()) for a, m in halves]
    torch.testing.assert_close(torch.cat(parts), whole)
