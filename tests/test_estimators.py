"""Tests for llm_mdp.estimators: hand-computed values, algebraic identities, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from llm_mdp import estimators as est
from llm_mdp.estimators import AdvantageInputs

torch.set_num_threads(1)
F64 = torch.float64


def t(x, dtype=F64):
    return torch.tensor(x, dtype=dtype)


def close(actual, expected, tol=1e-6):
    torch.testing.assert_close(actual, t(expected, actual.dtype), atol=tol, rtol=0)


def right_padded(lengths, width):
    return torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]


# ------------------------------------------------------------------ response-level estimators

MASK3 = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1]])


def test_reinforce_with_and_without_baseline():
    batch = AdvantageInputs(rewards=t([1.0, 0.0, 2.0]), mask=MASK3)
    close(est.reinforce(batch), [[1, 1, 0], [0, 0, 0], [2, 2, 2]])
    batch = AdvantageInputs(rewards=t([1.0, 0.0, 2.0]), mask=MASK3, baseline=t([0.5, 0.5, 1.0]))
    close(est.reinforce(batch), [[0.5, 0.5, 0], [-0.5, 0, 0], [1, 1, 1]])


def test_rloo_hand_example():
    # group 1: [1, 2, 6] -> 1 - 4, 2 - 3.5, 6 - 1.5; group 2: [0, 0, 3] -> -1.5, -1.5, 3
    batch = AdvantageInputs(rewards=t([1.0, 2, 6, 0, 0, 3]), mask=torch.ones(6, 2), group_size=3)
    close(est.rloo(batch)[:, 0], [-3, -1.5, 4.5, -1.5, -1.5, 3])
    close(est.rloo(batch)[:, 1], [-3, -1.5, 4.5, -1.5, -1.5, 3])


def test_remax_hand_example_and_missing_baseline():
    batch = AdvantageInputs(rewards=t([1.0, 0.0]), mask=torch.ones(2, 2), baseline=t([0.25, 0.5]))
    close(est.remax(batch), [[0.75, 0.75], [-0.5, -0.5]])
    with pytest.raises(ValueError, match=r"'remax' needs AdvantageInputs\.baseline"):
        est.remax(AdvantageInputs(rewards=t([1.0]), mask=torch.ones(1, 2)))


def test_grpo_hand_example_all_scalings():
    rewards, mask = t([1.0, 2, 6, 0, 0, 3]), torch.ones(6, 1)
    batch = AdvantageInputs(rewards=rewards, mask=mask, group_size=3)
    # group 1 mean 3, Bessel std sqrt((4 + 1 + 9) / 2) = sqrt(7) = 2.6457513
    # group 2 mean 1, Bessel std sqrt((1 + 1 + 4) / 2) = sqrt(3) = 1.7320508
    group = [-0.7559289, -0.3779645, 1.1338934, -0.5773503, -0.5773503, 1.1547005]
    close(est.grpo(batch, eps=0.0)[:, 0], group)
    # batch std of [1, 2, 6, 0, 0, 3]: mean 2, sum sq dev 26, /5 -> sqrt(5.2) = 2.2803509
    centred = [-2.0, -1, 3, -1, -1, 2]
    close(est.grpo(batch, std_scaling="batch", eps=0.0)[:, 0], [c / 2.2803509 for c in centred])
    close(est.grpo(batch, std_scaling="none")[:, 0], centred)
    # default eps: a constant group gets 0, not NaN
    flat = AdvantageInputs(rewards=t([1.0, 1.0]), mask=torch.ones(2, 3), group_size=2)
    close(est.grpo(flat), [[0.0] * 3] * 2)
    with pytest.raises(ValueError, match="std_scaling"):
        est.grpo(batch, std_scaling="rank")


def test_group_identities():
    g = 4
    rewards = torch.randn(12, generator=torch.Generator().manual_seed(0), dtype=F64)
    batch = AdvantageInputs(rewards=rewards, mask=torch.ones(12, 1), group_size=g)
    mean_only = est.grpo(batch, std_scaling="none")[:, 0]
    loo = est.rloo(batch)[:, 0]
    torch.testing.assert_close(mean_only, loo * (g - 1) / g)
    close(mean_only.view(3, g).sum(1), [0, 0, 0], 1e-12)
    close(loo.view(3, g).sum(1), [0, 0, 0], 1e-12)
    std = est.grpo(batch, eps=0.0)[:, 0].view(3, g)
    close(std.std(dim=1), [1, 1, 1], 1e-12)  # Bessel-corrected unit std per group


def test_group_size_errors():
    batch = AdvantageInputs(rewards=t([1.0, 2, 3]), mask=torch.ones(3, 1), group_size=2)
    for fn in (est.rloo, est.grpo):
        with pytest.raises(ValueError, match="group_size=2, B=3"):
            fn(batch)
    single = AdvantageInputs(rewards=t([1.0, 2]), mask=torch.ones(2, 1))
    with pytest.raises(ValueError, match="group_size=1"):
        est.grpo(single)
    with pytest.raises(ValueError, match="group_size=1"):
        est.rloo(single)


def test_inputs_shape_validation():
    with pytest.raises(ValueError, match="baseline must have shape"):
        AdvantageInputs(rewards=t([1.0, 2]), mask=torch.ones(2, 3), baseline=t([1.0]))
    with pytest.raises(ValueError, match="prefix_values must have shape \\(2, 4\\)"):
        AdvantageInputs(rewards=t([1.0, 2]), mask=torch.ones(2, 3), prefix_values=torch.ones(2, 3))


def test_advantages_carry_no_grad_and_zero_padding():
    rewards = t([1.0, -2.0]).requires_grad_()
    out = est.compute_advantages("reinforce", AdvantageInputs(rewards=rewards, mask=MASK3[:2]))
    assert not out.requires_grad
    assert out[0, 2] == 0 and out[1, 1:].abs().sum() == 0


# --------------------------------------------------------------------------- ZRA and GAE


def test_zra_token_rewards_and_discounted_returns():
    zra = est.zra_token_rewards(
        t([3.0, -1.0, 5.0]), torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
    )
    close(zra, [[0, 3, 0], [0, 0, -1], [0, 0, 0]])
    returns = est.discounted_returns(t([[1.0, 0.0, 2.0], [0.0, 4.0, 9.0]]), MASK3[[2, 0]], 0.5)
    close(returns, [[1.5, 1.0, 2.0], [2.0, 4.0, 0.0]])


def test_gae_hand_loop():
    # row 0 (T=3): deltas 0.4, -0.1, -0.3; A3 = 0.4, A2 = -0.1 + 0.25*0.4 = 0, A1 = -0.3
    # row 1 (T=2, NaN padding): deltas 1, -0.5; A2 = 1, A1 = -0.5 + 0.25 = -0.25
    token_rewards = t([[0.0, 0.0, 1.0], [0.0, 2.0, math.nan]])
    values = t([[0.5, 0.4, 0.6], [1.0, 1.0, math.nan]])
    mask = MASK3[[2, 0]]
    adv, ret = est.compute_gae(token_rewards, values, mask, gamma=0.5, lam=0.5)
    close(adv, [[-0.3, 0.0, 0.4], [-0.25, 1.0, 0.0]])
    close(ret, [[0.2, 0.4, 1.0], [0.75, 2.0, 0.0]])
    batch = AdvantageInputs(
        t([1.0, 2.0]), mask, token_rewards=token_rewards, values=values, gamma=0.5
    )
    close(est.gae(batch, lam=0.5), adv.tolist())
    close(est.gae(batch, gamma=1.0, lam=1.0), [[0.5, 0.6, 0.4], [1.0, 1.0, 0.0]])


def test_gae_zra_gamma_lambda_one_is_reward_minus_value():
    gen = torch.Generator().manual_seed(1)
    mask = right_padded([5, 1, 3, 4], 5)
    rewards, values = (
        torch.randn(4, generator=gen, dtype=F64),
        torch.randn(4, 5, generator=gen, dtype=F64),
    )
    batch = AdvantageInputs(
        rewards, mask, token_rewards=est.zra_token_rewards(rewards, mask), values=values
    )
    expected = torch.where(mask, rewards[:, None] - values, 0.0)
    torch.testing.assert_close(est.gae(batch), expected)
    with pytest.raises(ValueError, match="token_rewards"):
        est.gae(AdvantageInputs(rewards, mask, values=values))


# ---------------------------------------------------------------------------------- TRePO


def trepo_batch(known, values, rewards, lengths, width=4, next_values=None):
    return AdvantageInputs(
        rewards=t(rewards),
        mask=right_padded(lengths, width),
        prefix_values=t(values),
        prefix_known=torch.tensor(known, dtype=torch.bool),
        next_values=None if next_values is None else t(next_values),
    )


HAND = dict(
    known=[[1, 0, 1, 0, 0], [1, 0, 0, 0, 0]],
    values=[[0.2, math.nan, 0.8, math.nan, 99.0], [0.5, math.nan, 42.0, math.nan, math.nan]],
    rewards=[1.0, 0.0],
    lengths=[4, 2],
)


def test_trepo_hand_linear_and_constant():
    batch = trepo_batch(**HAND)
    # row 0: V = [0.2, 0.5, 0.8, 0.9, RM=1.0]; row 1: V = [0.5, 0.25, RM=0]
    close(est.trepo(batch), [[0.3, 0.3, 0.1, 0.1], [-0.25, -0.25, 0, 0]])
    # row 0: V = [0.2, 0.2, 0.8, 0.8, 1.0]; row 1: V = [0.5, 0.5, 0]
    close(est.trepo(batch, interpolation="constant"), [[0, 0.6, 0, 0.2], [0, -0.5, 0, 0]])


def test_trepo_next_values():
    nv = [[0.6, 0.7, 0.95, 123.0], [5.0, 5.0, 5.0, 5.0]]
    full = trepo_batch(
        [[1] * 5, [1] * 5],
        [[0.2, 0.5, 0.8, 0.9, 1.0], [0.5] * 5],
        [1.0, 0.0],
        [4, 1],
        next_values=nv,
    )
    close(est.trepo(full), [[0.4, 0.2, 0.15, 0.1], [-0.5, 0, 0, 0]])  # terminal uses RM(W)
    # s_3 unknown -> V(s_3) = 0.7 interpolated; next_values only at column 0
    part = trepo_batch(
        [[1, 1, 0, 1, 1]], [[0.2, 0.5, math.nan, 0.9, 1.0]], [1.0], [4], next_values=nv[:1]
    )
    close(est.trepo(part), [[0.4, 0.2, 0.2, 0.1]])


def test_trepo_errors():
    bad = dict(HAND, known=[[0, 0, 1, 0, 0], [1, 0, 0, 0, 0]])
    with pytest.raises(ValueError, match=r"prefix_known\[:, 0\].*rows \[0\]"):
        est.trepo(trepo_batch(**bad))
    left_padded = AdvantageInputs(
        t([1.0]),
        torch.tensor([[0, 1]]),
        prefix_values=torch.zeros(1, 3),
        prefix_known=torch.ones(1, 3, dtype=torch.bool),
    )
    with pytest.raises(ValueError, match="right-padded"):
        est.trepo(left_padded)
    with pytest.raises(ValueError, match="interpolation"):
        est.trepo(trepo_batch(**HAND), interpolation="cubic")


def random_trepo(seed, b=6, width=7):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, width + 1, (b,), generator=gen)
    mask = torch.arange(width)[None, :] < lengths[:, None]
    values = torch.randn(b, width + 1, generator=gen, dtype=F64)
    known = torch.rand(b, width + 1, generator=gen) < 0.4
    known[:, 0] = True
    rewards = torch.randn(b, generator=gen, dtype=F64)
    return mask, values, known, rewards, lengths


@pytest.mark.parametrize("seed", range(3))
def test_trepo_all_known_and_telescoping(seed):
    mask, values, known, rewards, lengths = random_trepo(seed)
    values_t = values.scatter(1, lengths[:, None], rewards[:, None])  # column T = RM(W)
    all_known = AdvantageInputs(
        rewards, mask, prefix_values=values_t, prefix_known=torch.ones_like(known)
    )
    direct = torch.where(mask, values_t[:, 1:] - values_t[:, :-1], 0.0)
    torch.testing.assert_close(est.trepo(all_known), direct)
    sparse = AdvantageInputs(rewards, mask, prefix_values=values, prefix_known=known)
    expected = torch.where(lengths > 0, rewards - values[:, 0], 0.0)
    for mode in ("linear", "constant"):
        torch.testing.assert_close(est.trepo(sparse, interpolation=mode).sum(1), expected)


def test_trepo_linear_interpolation_exact_on_linear_values():
    mask, _, known, _, lengths = random_trepo(7)
    cols = torch.arange(8, dtype=F64)
    values = 0.3 - 0.15 * cols.expand(6, 8)
    rewards = 0.3 - 0.15 * lengths.to(F64)
    batch = AdvantageInputs(rewards, mask, prefix_values=values, prefix_known=known)
    torch.testing.assert_close(est.trepo(batch), torch.where(mask, -0.15, 0.0).to(F64))


# ------------------------------------------------------------------------------------ KL


def test_kl_estimators_hand_values():
    logp, ref = t([[-1.0, -2.0, 0.0]]), t([[-1.5, -1.0, 7.0]])
    mask = torch.tensor([[1, 1, 0]])
    close(est.compute_kl("k1", logp, ref, mask), [[0.5, -1.0, 0]])
    close(est.compute_kl("k2", logp, ref, mask), [[0.125, 0.5, 0]])
    # exp(-0.5) - 0.5 = 0.1065307, exp(1) - 2 = 0.7182818
    close(est.compute_kl("k3", logp, ref, mask), [[0.1065307, 0.7182818, 0]])
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0), dtype=F64) * 5
    assert (est.k3(x, torch.zeros_like(x)) >= 0).all()


def test_kl_gradients_and_reward_placement():
    logp = t([[-1.0, -2.0]]).requires_grad_()
    ref = t([[-1.5, -1.0]])
    est.k3(logp, ref).sum().backward()
    close(logp.grad, [[1 - math.exp(-0.5), 1 - math.e]])  # (1 - rho) per token
    kl = est.k1(logp, ref)
    shaped = est.kl_in_reward(t([[0.0, 1.0]]), kl, beta=0.1, mask=torch.tensor([[1, 0]]))
    close(shaped, [[-0.05, 0.0]])
    assert not shaped.requires_grad


# -------------------------------------------------------------------------- policy losses


def test_ppo_clip_hand_cases_and_gradients():
    # (ratio, A): inside; clipped up (A>0); below range A>0 not clipped; below range A<0
    # clipped; above range A<0 not clipped; dual-clip case
    ratio = t([[1.1, 1.5, 0.5, 0.5, 1.5, 4.0]])
    adv = t([[1.0, 1.0, 1.0, -1.0, -1.0, -1.0]])
    mask = torch.ones(1, 6)
    logp = ratio.log().requires_grad_()
    out = est.ppo_clip(logp, torch.zeros(1, 6, dtype=F64), adv, mask, clip_low=0.2)
    close(out.loss, [[-1.1, -1.2, -0.5, 0.8, 1.5, 4.0]])
    close(out.stats["clipped"], [[0, 1, 0, 1, 0, 0]])
    close(out.stats["ratio"], ratio.tolist())
    out.loss.sum().backward()
    close(logp.grad, [[-1.1, 0, -0.5, 0, 1.5, 4.0]])  # -A * ratio where unclipped

    logp.grad = None
    out = est.ppo_clip(logp, torch.zeros(1, 6, dtype=F64), adv, mask, dual_clip=3.0)
    close(out.loss, [[-1.1, -1.2, -0.5, 0.8, 1.5, 3.0]])
    close(out.stats["dual_clipped"], [[0, 0, 0, 0, 0, 1]])
    out.loss.sum().backward()
    close(logp.grad, [[-1.1, 0, -0.5, 0, 1.5, 0]])


def test_ppo_clip_asymmetric_and_validation():
    logp, zero = t([[math.log(1.25), math.log(0.75)]]), torch.zeros(1, 2, dtype=F64)
    adv, mask = t([[1.0, -1.0]]), torch.ones(1, 2)
    close(est.ppo_clip(logp, zero, adv, mask).loss, [[-1.2, 0.8]])
    close(est.ppo_clip(logp, zero, adv, mask, clip_low=0.2, clip_high=0.28).loss, [[-1.25, 0.8]])
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        est.ppo_clip(logp, zero, adv, mask, dual_clip=0.5)


def test_vanilla_gradient_is_minus_advantage_times_grad_logp():
    gen = torch.Generator().manual_seed(3)
    theta = torch.randn(4, 3, dtype=F64, generator=gen).requires_grad_()  # logits per position
    tokens = torch.randint(0, 3, (5, 4), generator=gen)
    mask = right_padded([4, 2, 3, 1, 4], 4)
    adv = torch.randn(5, 4, dtype=F64, generator=gen)
    logp = theta.log_softmax(-1).expand(5, 4, 3).gather(2, tokens[..., None])[..., 0]
    out = est.vanilla(logp, logp.detach(), adv, mask)
    close(out.stats["ratio"], torch.where(mask, 1.0, 0.0).tolist())
    (grad,) = torch.autograd.grad(out.loss.sum(), theta, retain_graph=True)
    (expected,) = torch.autograd.grad((-adv * logp * mask).sum(), theta)
    torch.testing.assert_close(grad, expected)


# ---------------------------------------------------------------------------- aggregation


def test_aggregate_hand_values():
    x = t([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    close(est.aggregate(x, mask, "seq-mean-token-sum"), 5.0)  # (6 + 4) / 2
    close(est.aggregate(x, mask, "seq-mean-token-mean"), 3.0)  # (2 + 4) / 2
    close(est.aggregate(x, mask, "token-mean"), 2.5)  # 10 / 4
    close(est.aggregate(x, mask, "seq-mean-token-sum-norm"), 10 / 6)
    close(est.aggregate(x, mask, "seq-mean-token-sum-norm", max_len=5), 1.0)
    with pytest.raises(ValueError, match="known: seq-mean-token-sum"):
        est.aggregate(x, mask, "sum")


@pytest.mark.parametrize("mode", est.AGGREGATION_MODES)
def test_aggregate_partition_invariance(mode):
    gen = torch.Generator().manual_seed(11)
    b, width = 9, 6
    mask = torch.arange(width)[None, :] < torch.randint(0, width + 1, (b,), generator=gen)[:, None]
    theta = torch.randn(width, dtype=F64, generator=gen).requires_grad_()
    feats = torch.randn(b, width, dtype=F64, generator=gen)

    def loss(rows, **counts):
        return est.aggregate((feats[rows] * theta).sin(), mask[rows], mode, max_len=8, **counts)

    full = loss(torch.arange(b))
    (grad_full,) = torch.autograd.grad(full, theta)
    counts = {"num_sequences": b, "num_tokens": mask.sum()}
    parts = torch.randperm(b, generator=gen).tensor_split(3)
    total = sum(loss(p, **counts) for p in parts)
    (grad_parts,) = torch.autograd.grad(total, theta)
    torch.testing.assert_close(total, full, atol=1e-6, rtol=0)
    torch.testing.assert_close(grad_parts, grad_full, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------- registry


def test_registries_and_user_registration():
    assert set(est.ADVANTAGE_ESTIMATORS) == {
        *("reinforce", "rloo", "remax", "grpo", "gae", "trepo"),
        *("reinforce_pp", "reinforce_pp_baseline"),  # estimators_offpolicy
    }
    assert set(est.KL_ESTIMATORS) == {"k1", "k2", "k3"}
    assert set(est.POLICY_LOSSES) == {"vanilla", "ppo_clip", "gspo", "cispo"}
    with pytest.raises(ValueError, match="unknown advantage estimator 'nope'; known: gae, grpo"):
        est.get_advantage_estimator("nope")
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'; known: k1, k2, k3"):
        est.get_kl_estimator("k4")
    with pytest.raises(ValueError, match="unknown policy loss"):
        est.get_policy_loss("a2c")

    try:

        @est.register_advantage("double")
        def double(batch: AdvantageInputs, *, scale: float = 2.0):
            return batch.rewards[:, None] * scale * batch.mask

        rewards = t([1.0, 3.0]).requires_grad_()
        out = est.compute_advantages("double", AdvantageInputs(rewards, MASK3[:2]), scale=3.0)
        close(out, [[3, 3, 0], [9, 0, 0]])
        assert not out.requires_grad
        with pytest.raises(ValueError, match="already registered"):
            est.register_advantage("double")(double)
        with pytest.raises(TypeError):
            est.compute_advantages("double", AdvantageInputs(rewards, MASK3[:2]), scael=3.0)
    finally:
        est.ADVANTAGE_ESTIMATORS.pop("double", None)
