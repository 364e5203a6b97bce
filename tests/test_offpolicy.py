"""Exact off-policy theory: importance ratios, truncation, top-p bias, KL placements."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch

from llm_mdp import estimators as est
from llm_mdp.policies import TabularPolicy
from llm_mdp.theory import ExactModel, InputSpec, paper_setup
from llm_mdp.theory.kl import KLModel
from llm_mdp.theory.offpolicy import OffPolicyModel, OffPolicySpec, _group_aggregate, make_behavior
from llm_mdp.theory.offpolicy_kl import KL_GRADIENTS, documented_kl_gradient
from llm_mdp.theory.setups import ACTIONS, EOS, A

TOL = 1e-12


@pytest.fixture(scope="module")
def model() -> ExactModel:
    return paper_setup(seed=0)


def covering_behaviors(model: ExactModel) -> list:
    stale = TabularPolicy(len(ACTIONS), EOS, 4, [(A,)], seed=7, init_scale=1.0)
    table = torch.rand(
        model.pi.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64
    )
    return [
        make_behavior(model, "temperature", temperature=0.7),
        make_behavior(model, "temperature", temperature=1.5),
        make_behavior(model, "perturbed", scale=0.5, seed=1),
        make_behavior(model, "stale", policy=stale),
        make_behavior(model, "table", table=table + 0.05),
    ]


def rel_bias(om: OffPolicyModel, spec: OffPolicySpec) -> float:
    return om.compare(om.moments(spec)).relative_error


def test_sequence_ratio_reinforce_is_exactly_unbiased_under_every_covering_mismatch(
    model: ExactModel,
) -> None:
    for b in covering_behaviors(model):
        om = OffPolicyModel(model, b)
        assert om.covers
        assert float((om.mu_prob * om.sequence_ratio()).sum()) == pytest.approx(1.0, abs=1e-12)
        plain = rel_bias(om, OffPolicySpec())
        assert plain > 0.02, b.name  # the mismatch is real: uncorrected REINFORCE is biased
        mom = om.moments(OffPolicySpec(correction="seq_tis"))
        assert float((mom.mean - model.grad_J).abs().max()) < TOL, b.name
        # a baseline V(prompt) keeps it unbiased (Lemma 2 under mu: E_mu[rho psi] = 0)
        base = OffPolicySpec(correction="seq_tis", inputs=InputSpec(baseline="value"))
        assert float((om.moments(base).mean - model.grad_J).abs().max()) < TOL


def test_truncated_sequence_ratio_bias_shrinks_to_zero_as_the_cap_grows(model: ExactModel) -> None:
    om = OffPolicyModel(model, make_behavior(model, "temperature", temperature=0.7))
    rho_max = float(om.sequence_ratio().max())
    caps = [0.5, 1.0, 1.5, 2.0, 3.0, rho_max]
    biases = [rel_bias(om, OffPolicySpec(correction="seq_tis", cap=c)) for c in caps]
    assert all(b1 >= b2 - 1e-15 for b1, b2 in itertools.pairwise(biases)), biases
    assert biases[0] > 0.05 and biases[-1] < 1e-12
    masked = [rel_bias(om, OffPolicySpec(correction="seq_mis", cap=c)) for c in caps]
    assert masked[0] > biases[0] and masked[-1] < 1e-12  # masking drops more than capping


def test_token_level_corrections_stay_biased_untruncated_and_vanish_without_mismatch(
    model: ExactModel,
) -> None:
    """Token ratios fix each token's action, not the prefix or the continuation: biased
    even with ``C = inf``; the bias grows with the mismatch and is 0 at ``T = 1``."""
    by_temp = {}
    for t in (0.5, 0.7, 0.85, 1.0, 1.2):
        om = OffPolicyModel(model, make_behavior(model, "temperature", temperature=t))
        untruncated = rel_bias(om, OffPolicySpec(correction="tis"))
        by_temp[t] = untruncated
        rho_max = float(torch.exp(om.logp_pi - om.logp_mu)[model.tree.mask].max())
        # the limit C -> inf is reached at C = max token ratio, for both TIS and MIS
        assert rel_bias(om, OffPolicySpec(correction="tis", cap=rho_max)) == pytest.approx(
            untruncated, abs=1e-12
        )
        assert rel_bias(om, OffPolicySpec(correction="mis", cap=rho_max)) == pytest.approx(
            untruncated, abs=1e-12
        )
    assert by_temp[1.0] < TOL
    assert by_temp[0.5] > by_temp[0.7] > by_temp[0.85] > 0.01
    assert by_temp[1.2] > 0.01


def test_uncorrected_top_p_bias_equals_its_closed_form_and_the_irreducible_part(
    model: ExactModel,
) -> None:
    for kind, kw in (("top_p", {"top_p": 0.9}), ("top_p", {"top_p": 0.7}), ("top_k", {"top_k": 2})):
        om = OffPolicyModel(model, make_behavior(model, kind, **kw))
        assert not om.covers
        tb = om.truncation_bias()
        plain = om.moments(OffPolicySpec())
        assert float((plain.mean - tb.mean).abs().max()) < TOL
        assert float((tb.mean - (model.grad_J + tb.reweighting + tb.irreducible)).abs().max()) < TOL
        # E_mu[rho(W)] is the kept probability mass, and rho(W) removes only the re-weighting
        assert float((om.mu_prob * om.sequence_ratio()).sum()) == pytest.approx(tb.kept_mass)
        assert tb.kept_mass < 1.0
        seq = om.moments(OffPolicySpec(correction="seq_tis")).mean
        assert float((seq - (model.grad_J + tb.irreducible)).abs().max()) < TOL
        assert float(tb.irreducible.norm()) > 1e-3
        # sum over mu's support of pi(W) RM psi: the most any weight of sampled responses gives
        reach = om.sequence_is_target()
        assert float((reach - (model.grad_J + tb.irreducible)).abs().max()) < TOL


def test_group_aggregate_matches_the_registry_aggregation() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64)
    lengths = torch.randint(0, 6, (3, 4), generator=gen)
    m = torch.arange(5)[None, None, :] < lengths[..., None]
    for mode in est.AGGREGATION_MODES:
        ours = _group_aggregate(x, m, mode, 5)
        ref = torch.stack([est.aggregate(x[i], m[i], mode) for i in range(3)])
        assert torch.allclose(ours, ref, atol=1e-14), mode


def test_kl_placements_follow_their_documented_gradients(model: ExactModel) -> None:
    ref = TabularPolicy(len(ACTIONS), EOS, 4, [(A,)], seed=11, init_scale=1.0)
    klm = KLModel(model, ref)
    for (name, placement), _ in KL_GRADIENTS.items():
        got = klm.moments(name, placement).mean
        want = documented_kl_gradient(model, ref, name, placement)
        assert float((got - want).abs().max()) < 1e-12, (name, placement)
    # and the three loss placements really are different gradients (not all the KL's)
    full = documented_kl_gradient(model, ref, "k1", "reward")
    assert torch.allclose(full, klm.grad_kl, atol=1e-12)
    for name in ("k2", "k3"):
        assert float((documented_kl_gradient(model, ref, name, "loss") - full).norm()) > 1e-3


def test_gspo_and_cispo_on_policy_reduce_to_their_stated_estimators(model: ExactModel) -> None:
    om = OffPolicyModel(model, make_behavior(model, "on-policy"))
    tm = "seq-mean-token-mean"
    gspo_sum = om.moments(OffPolicySpec(loss="gspo")).mean
    assert float((gspo_sum - model.grad_J).abs().max()) < TOL  # token-sum: REINFORCE
    gspo_mean = om.moments(OffPolicySpec(loss="gspo", aggregation=tm)).mean
    lengths = model.tree.lengths.to(torch.float64)
    norm = model.moments_of_weights((model.rewards / lengths)[:, None] * model.tree.mask).mean
    assert float((gspo_mean - norm).abs().max()) < TOL  # the 1/|W| length re-weighting
    assert om.compare(om.moments(OffPolicySpec(loss="gspo", aggregation=tm))).relative_error > 0.05
    cispo = om.moments(OffPolicySpec(loss="cispo")).mean
    assert float((cispo - model.grad_J).abs().max()) < TOL


def test_dynamic_sampling_divides_the_expected_gradient_by_the_kept_probability() -> None:
    pol = TabularPolicy(len(ACTIONS), EOS, 4, [(A,)], seed=2, init_scale=1.0)
    m = ExactModel.from_functions(
        pol, [(A,)], ACTIONS, EOS, 4, length_cap="force-eos", reward=lambda p, r: float(A in r)
    )
    om = OffPolicyModel(m, make_behavior(m, "on-policy"))
    spec = OffPolicySpec(advantage="rloo", group_size=2)
    plain = om.moments(spec).mean
    dyn = om.moments(OffPolicySpec(advantage="rloo", group_size=2, dynamic_sampling=True)).mean
    assert float((plain - m.grad_J).abs().max()) < TOL  # RLOO is unbiased
    p1 = float(m.prob @ m.rewards)
    p_keep = 1.0 - p1**2 - (1.0 - p1) ** 2
    assert 0.05 < p_keep < 0.95
    assert torch.allclose(dyn, plain / p_keep, atol=1e-12)
    assert math.isclose(
        OffPolicyModel(m, make_behavior(m, "on-policy"))
        .compare(om.moments(OffPolicySpec(advantage="rloo", group_size=2, dynamic_sampling=True)))
        .cosine,
        1.0,
        abs_tol=1e-12,
    )


@pytest.mark.slow
def test_verify_off_policy_cli_passes_and_writes_the_figure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from llm_mdp.theory import verify_cli

    png, js = tmp_path / "offpolicy.png", tmp_path / "offpolicy.json"
    assert verify_cli(["--off-policy", "--plot", str(png), "--json", str(js)]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and out.count("PASS") == 5
    assert png.stat().st_size > 10_000
    data = json.loads(js.read_text())
    rows = {(r["estimator"], r["behavior"]): r for r in data["rows"]}
    assert rows[("REINFORCE + seq_tis (C=inf)", "stale")]["relative_bias"] < 1e-12
    assert rows[("REINFORCE + tis (C=inf)", "T=0.7")]["relative_bias"] > 0.1
    assert rows[("RLOO (G=2)", "on-policy")]["relative_bias"] < 1e-12


def test_new_losses_advantages_and_corrections_by_their_formulas() -> None:
    from llm_mdp import estimators_offpolicy as offp
    from llm_mdp.estimators import AdvantageInputs
    from llm_mdp.testing import assert_clipped_surrogate, assert_partition_invariant, loss_batch

    b = loss_batch(8, 6, group_size=2)
    logp, old, adv, mask = b["logp"], b["old_logp"], b["advantages"], b["mask"]
    m = mask.bool()
    # GSPO: one ratio per response, exp(mean log-ratio), on every token
    out = est.get_policy_loss("gspo")(logp, old, adv, mask, clip_low=0.5, clip_high=0.5)
    s = torch.exp(((logp - old) * m).sum(1) / m.sum(1))
    assert torch.allclose(out.stats["ratio"], s[:, None] * m)
    # CISPO: gradient -clip(r) A per token, no token dropped
    out = est.get_policy_loss("cispo")(logp, old, adv, mask, clip_high=0.05)
    (g,) = torch.autograd.grad(out.loss.sum(), logp)
    r = torch.exp(logp - old).detach()
    assert torch.allclose(g[m], (-r.clamp(max=1.05) * adv)[m])
    assert_clipped_surrogate("ppo_clip", clip_low=0.2, clip_high=0.28)
    for name in ("gspo", "cispo"):

        def loss(mb: dict, counts: dict, name: str = name) -> torch.Tensor:
            o = est.get_policy_loss(name)(mb["logp"], mb["old_logp"], mb["advantages"], mb["mask"])
            return est.aggregate(o.loss, mb["mask"], "token-mean", **counts)

        assert_partition_invariant(loss, loss_batch(8, 6, group_size=2))
    # REINFORCE++: token-normalised over the batch; -baseline: group mean, then batch std
    rewards = b["rewards"]
    batch = AdvantageInputs(rewards=rewards, mask=mask, group_size=2)
    a = est.compute_advantages("reinforce_pp", batch)
    assert abs(float(a[m].mean())) < 1e-12 and abs(float(a[m].std()) - 1.0) < 1e-6
    centred = rewards - rewards.view(4, 2).mean(1).repeat_interleave(2)
    tok = centred[:, None].expand(mask.shape)[m]
    want = centred[:, None] / (tok.std() + 1e-8)
    got = est.compute_advantages("reinforce_pp_baseline", batch)
    assert torch.allclose(got[m], want.expand(mask.shape)[m])
    # corrections: TRL's formulas
    rho = torch.exp(logp - old).detach()
    seq = torch.exp(((logp - old) * m).sum(1)).detach()
    w = offp.behavior_weights("tis", logp, old, mask, cap=1.1)
    assert torch.allclose(w[m], rho.clamp(max=1.1)[m])
    w = offp.behavior_weights("mis", logp, old, mask, cap=1.1, cap_low=0.9)
    assert torch.allclose(w[m], torch.where((rho <= 1.1) & (rho >= 0.9), rho, 0.0)[m])
    w = offp.behavior_weights("seq_mis", logp, old, mask, cap=1.2)
    want_seq = torch.where(seq <= 1.2, seq, 0.0)[:, None].expand(mask.shape)
    assert torch.allclose(w[m], want_seq[m]) and 0 < int((w[m] == 0).sum()) < int(m.sum())
    with pytest.raises(ValueError, match="unknown behavior correction 'vtrace'"):
        offp.get_behavior_correction("vtrace")
