"""The public testing API (``llm_mdp.testing``) and its pytest plugin.

Every built-in estimator gets the verdict of docs/theory.md#estimators through the public
API; planted bugs are caught with the right HINT; the plugin's fixtures work in a fresh
project that only has llm-mdp installed.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import textwrap
from collections import defaultdict
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest
import torch

from llm_mdp import estimators as est
from llm_mdp.estimators import AdvantageInputs
from llm_mdp.testing import (
    InputSpec,
    assert_biased,
    assert_kl_estimator,
    assert_partition_invariant,
    assert_unbiased,
    gradient_report,
    kl_report,
    loss_batch,
    reference_policy,
    small_mdp,
)
from llm_mdp.theory import paper_setup

torch.set_num_threads(1)
G = 4
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def mdp():
    return small_mdp()  # docs/theory.md#the-token-mdp: tabular, per-token rewards, gamma 1


@pytest.fixture(scope="module")
def gpt2():
    return small_mdp("gpt2")


@pytest.fixture(autouse=True)
def registries_stay_clean():
    adv, kl = set(est.ADVANTAGE_ESTIMATORS), set(est.KL_ESTIMATORS)
    yield
    assert set(est.ADVANTAGE_ESTIMATORS) == adv and set(est.KL_ESTIMATORS) == kl


# ----------------------------------------------------------------------------- MDPs


def test_small_mdp_variants():
    base = small_mdp()
    ref = paper_setup()
    assert base.tree.num_responses == 15 and not base.zra
    torch.testing.assert_close(base.grad_J, ref.grad_J, rtol=0, atol=0)
    # per-token rewards break ZRA: rewards before the last token
    assert float(base.token_rewards[:, :-1][base.tree.mask[:, 1:]].abs().max()) > 0.1
    zra = small_mdp(zra=True, seed=3)
    assert zra.zra and zra.tree.num_responses == 15
    binary = small_mdp(zra=True, binary_rewards=True)
    assert set(binary.rewards.tolist()) == {0.0, 1.0}
    process = small_mdp(binary_rewards=True)  # binary RM paid at a token, not at the end
    assert set(process.rewards.tolist()) == {0.0, 1.0} and not process.zra
    early = process.token_rewards[:, 0] * (process.tree.lengths > 1)
    assert float(early.max()) == 1.0
    assert small_mdp(num_prompts=2).tree.num_responses == 30
    assert small_mdp(length_cap="env").tree.num_responses == 31
    assert small_mdp(gamma=0.9).gamma == 0.9
    assert small_mdp("llama", zra=True).num_params > 1000
    with pytest.raises(ValueError, match=r"eq\. \(26\)"):
        small_mdp(zra=True, gamma=0.9)
    with pytest.raises(ValueError, match="kind must be one of"):
        small_mdp("gpt5")


def test_reference_policy_hits_the_target_kl(mdp, gpt2):
    for model in (mdp, gpt2):
        report = kl_report("k1", model, ref_policy=reference_policy(model, target_kl=0.05))
        assert 0.04 <= report.exact_kl <= 0.06


# ------------------------------------------------ built-in estimators: the verdicts of docs/theory.md


def test_unbiased_builtins(mdp):
    assert_unbiased(est.reinforce, mdp, inputs={})  # RM(W), Theorem 1
    assert_unbiased("reinforce", mdp, inputs={"baseline": "value"})
    assert_unbiased(est.rloo, mdp, group_size=G)
    assert_unbiased(est.remax, mdp, group_size=G, inputs={"baseline": "greedy"})
    # PPO's GAE with the exact critic: ZRA rewards, lam = 1 (table), and true token rewards
    zra_critic = InputSpec(token_rewards="zra", values="exact")
    assert_unbiased(est.gae, mdp, options={"lam": 1.0}, inputs=zra_critic)
    true_critic = InputSpec(token_rewards="true", values="exact")
    for lam in (1.0, 0.5, 0.0):
        assert_unbiased(est.gae, mdp, options={"lam": lam}, inputs=true_critic)
    # TRePO at all positions: exact values (Theorem 2) and Monte Carlo values with K = 1, 4
    assert_unbiased(est.trepo, mdp, inputs={"prefix_values": "exact"})
    for k in (1, 4):
        report = assert_unbiased(est.trepo, mdp, inputs={"prefix_values": "mc", "rollouts": k})
        assert report.is_exact and report.relative_error < 1e-12


def test_biased_builtins_with_the_stated_figures(mdp):
    # GRPO mean only (Dr. GRPO): exactly (G-1)/G x grad J
    report = assert_biased(
        est.grpo, mdp, group_size=G, options={"std_scaling": "none"}, expected_scale=(G - 1) / G
    )
    assert report.projection == pytest.approx(0.75, abs=1e-12)
    assert report.cosine == pytest.approx(1.0, abs=1e-12)
    # GRPO with std: biased in direction; cosine 0.9489 here (it depends on the draws)
    report = assert_biased(est.grpo, mdp, group_size=G, cosine=(0.9, 0.999))
    assert report.cosine == pytest.approx(0.94892, abs=1e-4)
    # TRePO with few anchors: biased, less with more anchors (m = 3 covers every position)
    cos = []
    for m in (1, 2):
        inputs = {"prefix_values": "mc", "rollouts": 4, "anchors": m}
        cos.append(assert_biased(est.trepo, mdp, inputs=inputs, cosine=(0.9, 0.9999)).cosine)
    assert cos[0] < cos[1]
    assert_unbiased(est.trepo, mdp, inputs={"prefix_values": "mc", "rollouts": 4, "anchors": 3})


def test_gradient_report_numbers(mdp):
    r = gradient_report("rloo", mdp, group_size=G)
    assert r.bias.shape == r.grad_J.shape == (mdp.num_params,)
    assert r.bias_norm < 1e-12 and r.cosine == pytest.approx(1.0) and r.hints == ()
    assert r.variance == r.trace_cov > 0 and r.trace_cov_per_response == 4 * r.trace_cov
    assert "rloo (G=4" in str(r) and "variance (tr Cov)" in str(r)
    # the registry's theory numbers: Theorem 2 (trepo on exact values) has lower variance
    thm2 = gradient_report("trepo", mdp, inputs={"prefix_values": "exact"})
    plain = gradient_report("reinforce", mdp, inputs={})
    assert thm2.variance < plain.variance
    assert thm2.variance == pytest.approx(0.18344, abs=1e-4)  # as tests/test_theory.py


def test_transformer_and_zra_binary_mdps(gpt2):
    assert_unbiased(est.rloo, gpt2, group_size=G)
    assert_biased(
        est.grpo, gpt2, group_size=G, options={"std_scaling": "none"}, expected_scale=0.75
    )
    binary = small_mdp("llama", zra=True, binary_rewards=True)
    assert_unbiased(est.rloo, binary, group_size=G)
    # one prompt, binary rewards: GRPO's std normalisation is a pure scale (J = P(success))
    r = gradient_report(est.grpo, binary, group_size=G)
    assert r.cosine == pytest.approx(1.0, abs=1e-9) and r.projection > 1.0


# ------------------------------------------------------------ planted bugs and their hints


def baseline_with_self(batch: AdvantageInputs) -> torch.Tensor:
    r = batch.rewards.view(-1, batch.group_size)
    return (r - r.mean(1, keepdim=True)).reshape(-1, 1) * batch.mask


def sign_flipped(batch: AdvantageInputs) -> torch.Tensor:
    return -est.rloo(batch)


def test_planted_baseline_with_self_is_caught(mdp):
    with pytest.raises(AssertionError) as info:
        assert_unbiased(baseline_with_self, mdp, group_size=G)
    msg = str(info.value)
    assert "looks like a (G-1)/G = 0.75 scaling: a mean baseline that includes the sample" in msg
    # which coordinate, how far, exact against estimate
    assert "logits[0, 1] (state 'a' + '', token 'a'): exact grad J 0.135004, estimate" in msg
    assert "projection ratio 0.750000" in msg and "cosine 1.000000" in msg


def test_planted_sign_flip_is_caught(mdp, gpt2):
    for model in (mdp, gpt2):
        with pytest.raises(AssertionError, match="sign flip: cosine -1, E g = exactly -grad J"):
            assert_unbiased(sign_flipped, model, group_size=G)


def test_other_failures_are_named(mdp):
    with pytest.raises(AssertionError, match="exactly that of GRPO's std normalisation"):
        assert_unbiased("grpo", mdp, group_size=G)

    def per_token_mean(batch: AdvantageInputs) -> torch.Tensor:
        return est.rloo(batch) / batch.mask.sum(1, keepdim=True)

    with pytest.raises(AssertionError, match="RLOO divided by the response length"):
        assert_unbiased(per_token_mean, mdp, group_size=G)

    def own_reward_baseline(batch: AdvantageInputs) -> torch.Tensor:
        return est.reinforce(batch) - batch.rewards[:, None] * batch.mask

    with pytest.raises(AssertionError, match="E g = 0: the weight of every token"):
        assert_unbiased(own_reward_baseline, mdp)
    with pytest.raises(AssertionError, match=r"ZRA with gamma < 1, eq. \(26\)"):
        assert_unbiased(
            "gae",
            small_mdp(gamma=0.9),
            options={"lam": 1.0},
            inputs={"token_rewards": "zra", "values": "zero"},
        )
    with pytest.raises(AssertionError, match=r"is unbiased on .* use assert_unbiased"):
        assert_biased("rloo", mdp, group_size=G, expected_scale=0.75)
    with pytest.raises(AssertionError, match=r"cosine 0.948922 outside \[0.5, 0.9\]"):
        assert_biased("grpo", mdp, group_size=G, cosine=(0.5, 0.9))
    with pytest.raises(AssertionError, match=r"expected_scale=0.5\) failed.*\n.*\n.*0.5 x grad J"):
        assert_biased(baseline_with_self, mdp, group_size=G, expected_scale=0.5)


def test_bad_estimator_outputs_get_clear_errors(mdp):
    def per_response(batch: AdvantageInputs) -> torch.Tensor:
        return batch.rewards

    def verl_style(batch: AdvantageInputs) -> tuple[torch.Tensor, torch.Tensor]:
        adv = est.rloo(batch)
        return adv, adv

    with pytest.raises(ValueError, match=r"adv\[:, None\] \* batch.mask"):
        assert_unbiased(per_response, mdp)
    with pytest.raises(TypeError, match="returned a tuple"):
        assert_unbiased(verl_style, mdp, group_size=G)
    with pytest.raises(ValueError, match="unknown advantage estimator"):
        assert_unbiased("no_such_estimator", mdp)


# --------------------------------------------------- wrapping a verl / TRL-style function


def compute_grpo_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray,
    epsilon: float = 1e-6,
    norm_adv_by_std_in_grpo: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A stand-in with verl's signature and behaviour (verl is not a dependency)."""
    scores = token_level_rewards.sum(-1)
    groups: dict[object, list[int]] = defaultdict(list)
    for i, key in enumerate(index):
        groups[key].append(i)
    out = scores.clone()
    for rows in groups.values():
        s = scores[rows]
        mean, std = (s.mean(), s.std()) if len(rows) > 1 else (0.0, 1.0)
        out[rows] = (s - mean) / (std + epsilon) if norm_adv_by_std_in_grpo else s - mean
    adv = out[:, None] * response_mask
    return adv, adv


def verl_grpo(batch: AdvantageInputs, *, norm_adv_by_std_in_grpo: bool = True) -> torch.Tensor:
    """The docs' wrapper: verl's (token_level_rewards, response_mask, index) from the batch."""
    token_level_rewards = est.zra_token_rewards(batch.rewards, batch.mask)
    index = np.arange(len(batch.rewards)) // batch.group_size  # verl: one uid per prompt
    adv, _returns = compute_grpo_outcome_advantage(
        token_level_rewards,
        batch.mask.to(token_level_rewards.dtype),
        index,
        norm_adv_by_std_in_grpo=norm_adv_by_std_in_grpo,
    )
    return adv


def trl_style_rloo(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """TRL-style: one advantage per completion from a flat ``(B,)`` reward vector."""
    r = rewards.view(-1, num_generations)
    return ((r * num_generations - r.sum(1, keepdim=True)) / (num_generations - 1)).reshape(-1)


def test_wrapped_verl_and_trl_functions(mdp):
    assert_biased(  # as in docs/testing.md
        verl_grpo,
        mdp,
        group_size=G,
        options={"norm_adv_by_std_in_grpo": False},
        expected_scale=(G - 1) / G,
    )
    dr_grpo = functools.partial(verl_grpo, norm_adv_by_std_in_grpo=False)
    report = gradient_report(dr_grpo, mdp, group_size=G)
    assert report.estimator == "verl_grpo(norm_adv_by_std_in_grpo=False)"
    assert report.projection == pytest.approx(0.75, abs=1e-12)
    ours = gradient_report("grpo", mdp, group_size=G)
    theirs = gradient_report(verl_grpo, mdp, group_size=G)
    torch.testing.assert_close(theirs.mean, ours.mean, rtol=0, atol=1e-12)

    def trl_rloo(batch: AdvantageInputs) -> torch.Tensor:
        return trl_style_rloo(batch.rewards, batch.group_size)[:, None] * batch.mask

    assert_unbiased(trl_rloo, mdp, group_size=G)


# ------------------------------------------------------------------------------------ KL


def k3_ratio_inverted(logp, ref_logp, mask=None):
    x = est.k1(logp, ref_logp, mask)
    return torch.exp(x) - 1 - x


def test_kl_estimators_verdicts(mdp, gpt2):
    for model in (mdp, gpt2):
        assert_kl_estimator(est.k1, model, value="exact", placement="reward", gradient="unbiased")
        assert_kl_estimator(est.k3, model, value="exact", placement="loss", gradient="biased")
        assert_kl_estimator(est.k2, model, value="second-order")
    report = assert_kl_estimator("k1", mdp, placement="loss", gradient="biased")
    assert float(report.gradients["loss"].abs().max()) < 1e-12  # E grad log pi = 0
    assert report.forms == ("k1 = x",)


def test_planted_k3_with_inverted_ratio_is_caught(mdp, gpt2):
    for model in (mdp, gpt2):
        with pytest.raises(AssertionError) as info:
            assert_kl_estimator(k3_ratio_inverted, model)
        msg = str(info.value)
        assert "HINT: k3 with the ratio inverted: exp(logp - ref_logp) - 1" in msg
        assert "exact KL(pi || pi_ref) = " in msg and "KL(pi_ref || pi) = " in msg


def test_other_kl_failures_are_named(mdp):
    with pytest.raises(AssertionError, match=r"this is k2 = x\^2 / 2, right only to second"):
        assert_kl_estimator("k2", mdp)

    def swapped(logp, ref_logp, mask=None):
        return est.k1(ref_logp, logp, mask)

    with pytest.raises(AssertionError, match="sign flip: the estimate is log pi_ref - log pi"):
        assert_kl_estimator(swapped, mdp)

    def doubled(logp, ref_logp, mask=None):
        return 2 * est.k2(logp, ref_logp, mask)

    with pytest.raises(AssertionError, match="k2 without the 1/2"):
        assert_kl_estimator(doubled, mdp, value="second-order")

    def forward_kl(logp, ref_logp, mask):  # importance-weighted KL(pi_ref || pi), last token
        x = est.k1(logp, ref_logp, mask).sum(1, keepdim=True)
        last = mask.bool() & (mask.long().cumsum(1) == mask.long().sum(1, keepdim=True))
        return torch.where(last, -x * torch.exp(-x), torch.zeros_like(logp))

    with pytest.raises(AssertionError, match=r"equals KL\(pi_ref \|\| pi\) instead of KL"):
        assert_kl_estimator(forward_kl, mdp)
    with pytest.raises(AssertionError, match="k1 in the loss gives sum_t grad log pi, zero"):
        assert_kl_estimator("k1", mdp, placement="loss", gradient="unbiased")
    with pytest.raises(AssertionError, match=r"k3 gives \(1 - pi_ref / pi\) grad log pi"):
        assert_kl_estimator("k3", mdp, placement="loss", gradient="unbiased")


# ---------------------------------------------------------------- partition invariance


def global_loss(mode: str):
    def loss_fn(mb, counts):
        out = est.ppo_clip(mb["logp"], mb["old_logp"], mb["advantages"], mb["mask"])
        return est.aggregate(out.loss, mb["mask"], mode, **counts)

    loss_fn.__name__ = f"global_{mode}"
    return loss_fn


def local_token_mean(mb, counts):  # planted bug: the micro-batch's own token count
    out = est.ppo_clip(mb["logp"], mb["old_logp"], mb["advantages"], mb["mask"])
    return est.aggregate(out.loss, mb["mask"], "token-mean")


def test_partition_invariant_losses_pass():
    batch = loss_batch(8, 6, group_size=2)
    for mode in est.AGGREGATION_MODES:
        assert_partition_invariant(global_loss(mode), batch, group_size=2)
    assert_partition_invariant(
        global_loss("token-mean"), batch, splits=[[0, 5, 7], [1, 2, 3, 4, 6]]
    )

    def grpo_loss(mb, counts):  # group statistics inside the loss: groups stay whole
        adv = est.grpo(AdvantageInputs(rewards=mb["rewards"], mask=mb["mask"], group_size=2))
        return est.aggregate(-adv * mb["logp"], mb["mask"], "seq-mean-token-sum", **counts)

    assert_partition_invariant(grpo_loss, batch, group_size=2, splits=[2, 6])
    # w.r.t. a model's parameters
    model = torch.nn.Linear(3, 1).double()
    feats = torch.randn(8, 6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    data = {**batch, "feats": feats}

    def model_loss(mb, counts):
        logp = model(mb["feats"]).squeeze(-1)
        return est.aggregate(-mb["advantages"] * logp, mb["mask"], "token-mean", **counts)

    assert_partition_invariant(model_loss, data, params=model.parameters(), splits=[1, 7])


def test_planted_local_normalization_is_caught():
    batch = loss_batch(8, 6, group_size=2)
    with pytest.raises(AssertionError) as info:
        assert_partition_invariant(local_token_mean, batch)
    msg = str(info.value)
    assert "HINT: loss normalized per micro-batch instead of globally" in msg
    assert "own token count instead of counts['num_tokens']" in msg
    assert "ignores the counts it is given" in msg

    def equal_parts_assumed(mb, counts):  # local mean / number of parts, assumed equal
        n_parts = int(counts["num_sequences"]) // len(mb["mask"])
        loss = est.aggregate(mb["logp"] * mb["advantages"], mb["mask"], "seq-mean-token-sum")
        return loss / n_parts

    assert_partition_invariant(equal_parts_assumed, batch, splits=2)  # equal halves pass
    with pytest.raises(
        AssertionError,
        match="1 of 2 parts were divided by the micro-batch's own number of sequences",
    ):
        assert_partition_invariant(equal_parts_assumed, batch, splits=[2, 6])
    with pytest.raises(ValueError, match="split sizes"):
        assert_partition_invariant(local_token_mean, batch, splits=[3, 5], group_size=2)


# --------------------------------------------------------------------------- the plugin

PLUGIN_TEST = """
import pytest
import torch

from llm_mdp import estimators as est
from llm_mdp.testing import assert_partition_invariant, assert_unbiased


def test_fixtures(exact_mdp, tabular_mdp, zra_mdp, small_mdp_factory):
    assert exact_mdp.tree.num_responses == 15 and tabular_mdp is exact_mdp
    assert zra_mdp.zra and small_mdp_factory() is exact_mdp


@pytest.mark.parametrize("transformer_mdp", ["gpt2", {"kind": "llama", "zra": True}],
                         indirect=True)
def test_rloo_on_transformers(transformer_mdp):
    assert transformer_mdp.num_params > 1000
    assert_unbiased("rloo", transformer_mdp, group_size=2)


def test_each_mdp(each_mdp):
    assert_unbiased(est.rloo, each_mdp, group_size=2)


def test_loss_batch(random_loss_batch):
    def loss(mb, counts):
        return est.aggregate(-mb["advantages"] * mb["logp"], mb["mask"], "token-mean", **counts)
    assert_partition_invariant(loss, random_loss_batch, group_size=2)


def test_planted_bug_fails_with_a_hint(exact_mdp):
    def flipped(batch):
        return -est.rloo(batch)
    assert_unbiased(flipped, exact_mdp, group_size=2)
"""


def test_pytest_plugin_in_a_fresh_project(tmp_path):
    """A project with no conftest: the fixtures come from the installed entry point.

    About 5 s (a fresh interpreter importing torch and transformers), so not marked slow.
    Needs the package installed (``pip install -e .``) so that the entry point exists.
    """
    plugins = {ep.value for ep in entry_points(group="pytest11")}
    assert "llm_mdp.testing.plugin" in plugins, (
        "the pytest11 entry point is not installed: run `pip install --no-deps -e .`"
    )
    (tmp_path / "test_mine.py").write_text(textwrap.dedent(PLUGIN_TEST))
    # the example a user copies into their own suite runs there too
    shutil.copy(ROOT / "examples" / "06_test_your_estimator.py", tmp_path / "test_example.py")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rN", "--tb=short"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert "1 failed, 15 passed" in out, out[-4000:]
    assert "test_planted_bug_fails_with_a_hint" in out
    assert "HINT: sign flip: cosine -1, E g = exactly -grad J" in out, out[-4000:]
    assert "exact grad J" in out and "logits[" in out
