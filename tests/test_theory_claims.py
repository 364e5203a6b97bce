"""What "lowest variance" means, checked exactly: the statements of docs/theory.md#theorem-2
and docs/theory.md#estimators, each with the counterexample that bounds it."""

from __future__ import annotations

import pytest
import torch

from llm_mdp.testing import small_mdp
from llm_mdp.theory import ExactModel
from llm_mdp.theory.baselines import optimal_shift, score_norms, shifted_trace

F64 = torch.float64


def _trace(model: ExactModel, name: str, **options: object) -> float:
    return model.moments_of_weights(model.weights(name, **options)).trace_cov


def _best_state_shift(model: ExactModel) -> tuple[torch.Tensor, float]:
    tr, l1 = model.tree, model.weights("lemma1")
    c = optimal_shift(model, l1, tr.node_of, tr.num_nodes)
    return c, shifted_trace(model, l1, tr.node_of, c)


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_theorem2_is_the_best_state_shift_when_score_norms_are_flat(gamma: float) -> None:
    """Uniform tabular policy: |grad log pi(w|s)|^2 is the same for every w, so the best
    c(s) of Lemma 2's family is -gamma^(t-1) V(s): Theorem 2 has the least variance."""
    model = small_mdp(init_scale=0.0, gamma=gamma)
    c, best = _best_state_shift(model)
    free = ~model.tree.forced
    depth = model.tree.node_depth.to(F64)
    torch.testing.assert_close(c[free], -(gamma**depth * model.V)[free], rtol=0, atol=1e-12)
    assert _trace(model, "theorem2") == pytest.approx(best, rel=1e-12)
    for other in ("lemma1", "theorem1", "reinforce"):
        assert _trace(model, other) > best


@pytest.mark.parametrize("seed", [0, 2])
def test_best_state_shift_is_the_score_weighted_value(seed: int) -> None:
    """Tabular policy (scores of distinct states orthogonal): the best shift at s is
    -gamma^(t-1) E[Q |grad log pi|^2 | s] / E[|grad log pi|^2 | s]."""
    model = small_mdp(seed=seed, gamma=0.9)
    c, _ = _best_state_shift(model)
    n2, pi = score_norms(model), model.pi
    depth = model.tree.node_depth.to(F64)
    closed = -(0.9**depth) * (pi * model.Q * n2).sum(1) / (pi * n2).sum(1)
    free = ~model.tree.forced
    torch.testing.assert_close(c[free], closed[free], rtol=0, atol=1e-12)


def test_counterexample_lemma1_below_theorem2() -> None:
    """Binary process rewards, seed 2: Lemma 1 (no baseline at all) has a smaller
    tr Cov than Theorem 2, and the best state shift is smaller than both."""
    model = small_mdp(seed=2)
    lemma1, theorem2 = _trace(model, "lemma1"), _trace(model, "theorem2")
    _, best = _best_state_shift(model)
    assert lemma1 == pytest.approx(0.376549852480, abs=1e-10)
    assert theorem2 == pytest.approx(0.644746699546, abs=1e-10)
    assert best == pytest.approx(0.230901644484, abs=1e-10)
    assert best < lemma1 < theorem2


def _prompt_baseline_terms(model: ExactModel) -> tuple[float, float]:
    """``E |S|^2`` and ``E[RM |S|^2]`` with ``S = sum_t grad log pi(w_t | s_t)``."""
    tr = model.tree
    ones = tr.mask.to(F64)
    dense = torch.zeros(tr.num_responses, tr.num_pairs, dtype=F64)
    dense.scatter_add_(1, tr.pair, ones)
    s2 = torch.einsum("nk,kl,nl->n", dense, model.gram, dense)
    return float(model.prob @ s2), float(model.prob @ (model.rewards * s2))


@pytest.mark.parametrize("seed", [0, 2])
def test_prompt_baseline_changes_variance_by_the_exact_quadratic(seed: int) -> None:
    """tr Cov(b) - tr Cov(0) = b^2 E|S|^2 - 2 b E[RM |S|^2]: V(w_0) helps iff it lies
    between 0 and 2 b*, b* = E[RM |S|^2] / E|S|^2 (the best constant baseline)."""
    model = small_mdp(seed=seed, zra=True)
    es2, ers2 = _prompt_baseline_terms(model)
    v = float(model.prompt_value[0])
    delta = _trace(model, "reinforce", baseline=True) - _trace(model, "reinforce")
    assert delta == pytest.approx(v * v * es2 - 2 * v * ers2, abs=1e-12)
    groups = model.tree.resp_prompt[:, None].expand(-1, model.tree.horizon)
    b = -float(optimal_shift(model, model.weights("reinforce"), groups, 1)[0])
    assert b == pytest.approx(ers2 / es2, abs=1e-12)
    assert (delta < 0) == (0 < v / b < 2)


def test_counterexample_prompt_baseline_raises_reinforce_variance() -> None:
    """ZRA rewards, seed 0: V(w_0) = -0.193 but b* = -0.054, so V(w_0) lies beyond 2 b*
    and the prompt baseline raises REINFORCE's variance."""
    model = small_mdp(seed=0, zra=True)
    plain, with_v = _trace(model, "reinforce"), _trace(model, "reinforce", baseline=True)
    assert plain == pytest.approx(0.580844041210, abs=1e-10)
    assert with_v == pytest.approx(0.603301246560, abs=1e-10)
    assert float(model.prompt_value[0]) == pytest.approx(-0.192799967148, abs=1e-10)
    es2, ers2 = _prompt_baseline_terms(model)
    assert ers2 / es2 == pytest.approx(-0.053749415872, abs=1e-10)


def test_token_weights_figure(tmp_path) -> None:
    """The docs figure's data: Theorem 2 telescopes, PPO is RM - V(s_t), GRPO (G-1)/G."""
    from llm_mdp.theory import figures

    model = figures.zra_setup()
    tr = model.tree
    w = int(torch.where(tr.lengths == tr.lengths.max(), model.prob, -1.0).argmax())
    weights = figures.token_weights(model, w, group_size=4)
    rm, v = float(model.rewards[w]), model.V[tr.node_of[w, : int(tr.lengths[w])]]
    ppo, thm2, grpo = (next(val for key, val in weights.items() if key.startswith(p))
                       for p in ("PPO", "Theorem 2", "GRPO"))  # fmt: skip
    assert sum(thm2) == pytest.approx(rm - float(v[0]), abs=1e-12)
    torch.testing.assert_close(torch.tensor(ppo, dtype=F64), rm - v, rtol=0, atol=1e-12)
    assert grpo[0] == pytest.approx(0.75 * (rm - float(v[0])), abs=1e-12)
    assert figures.main([str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["response_tree.png", "token_weights.png"]
