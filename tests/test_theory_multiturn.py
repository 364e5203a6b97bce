"""The exact toolkit on multi-turn trees: the environment's replies are chance nodes.

``docs/theory.md#multi-turn``: after a policy EOS that does not end the episode the
environment appends reply tokens (not actions), one of several outcomes at random. The
tree, ``P(W)``, ``J`` and ``grad J`` are checked against a brute-force sum over
trajectories written here (it shares no code with the toolkit but the policy's table),
and every registered estimator's exact mean against ``grad J``.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from llm_mdp.cli import main
from llm_mdp.cli import verify as verify_cli
from llm_mdp.estimators import ADVANTAGE_ESTIMATORS
from llm_mdp.policies import TabularPolicy
from llm_mdp.tasks import Turn, char_tokenizer, replay_turns
from llm_mdp.theory import (
    SETUPS,
    EstimatorSpec,
    ExactModel,
    InputSpec,
    echo_setup,
    enumerate_tree,
    make_policy,
    verify,
)
from llm_mdp.theory.offpolicy import OffPolicyModel, OffPolicySpec, make_behavior

TOK = char_tokenizer("ab")
EOS = int(TOK.eos_token_id)
A, B = TOK.encode("ab", add_special_tokens=False)
ACTIONS = (EOS, A, B)
PROMPT = (A,)
HORIZON = 6
MAX_TURNS = 3
TOL = 1e-12


Outcomes = list[tuple[float, list[int]]]


def replies(response: tuple[int, ...], turns: int) -> Outcomes | list[int]:
    """The environment of these tests, a function of the conversation so far.

    After an empty first turn: ``ab`` (1/4), ``aa`` (1/2) or ``b`` (1/4): two outcomes share
    their first token, so the chance node after it is random again. After a non-empty
    first turn: ``b`` for sure (plain token ids). After the second turn: ``a`` (0.6) or
    ``b`` (0.4). The third turn ends the episode (``MAX_TURNS``).
    """
    if turns == 1:
        return [(0.25, [A, B]), (0.5, [A, A]), (0.25, [B])] if response == (EOS,) else [B]
    return [(0.6, [A]), (0.4, [B])]


def reply_fn(turn: Turn) -> Outcomes | list[int]:
    return replies(turn.response_ids, turn.turn)


def reward(prompt: tuple[int, ...], response: tuple[int, ...]) -> float:
    """A fixed pseudo-random ``RM(W)`` in ``[-1, 1]`` per response."""
    return random.Random(repr((prompt, response))).uniform(-1.0, 1.0)


def policy(seed: int = 0) -> TabularPolicy:
    pol = TabularPolicy(3, EOS, HORIZON, [PROMPT], seed=seed, init_scale=1.0, multi_turn=True)
    return pol.double()


def model(length_cap: str = "env", seed: int = 0) -> ExactModel:
    return ExactModel.from_functions(
        policy(seed),
        [PROMPT],
        ACTIONS,
        EOS,
        HORIZON,
        length_cap=length_cap,
        reward=reward,
        reply_fn=reply_fn,
        max_turns=MAX_TURNS,
        tokenizer=TOK,
    )


def brute_force_J(pol: TabularPolicy, length_cap: str) -> torch.Tensor:
    """``J = sum_W P(W) RM(W)`` by walking every trajectory: the policy's log-probs from
    its table, whole replies at once with their probabilities; differentiable."""
    log_pi = torch.log_softmax(pol.logits, dim=-1)
    total = torch.zeros((), dtype=torch.float64)

    def walk(prefix: tuple[int, ...], turns: int, logp: torch.Tensor) -> None:
        nonlocal total
        forced = length_cap == "force-eos" and len(prefix) == HORIZON - 1
        row = log_pi[pol.node_index(PROMPT, prefix)]
        for a in ACTIONS:
            if forced and a != EOS:
                continue
            nxt, lp = (*prefix, a), logp + (0.0 if forced else row[a])
            ended = a == EOS and turns + 1 >= MAX_TURNS
            if ended or len(nxt) == HORIZON:
                total = total + lp.exp() * reward(PROMPT, nxt)
                continue
            if a != EOS:
                walk(nxt, turns, lp)
                continue
            out = replies(nxt, turns + 1)
            outcomes = out if isinstance(out[0], tuple) else [(1.0, out)]
            for p, ids in outcomes:
                full = (*nxt, *ids)
                if len(full) >= HORIZON:  # the cap cuts the reply
                    total = total + (lp + math.log(p)).exp() * reward(PROMPT, full[:HORIZON])
                else:
                    walk(full, turns + 1, lp + math.log(p))

    walk((), 0, torch.zeros((), dtype=torch.float64))
    return total


@pytest.mark.parametrize("length_cap", ["env", "force-eos"])
def test_J_and_grad_J_equal_a_brute_force_sum_over_trajectories(length_cap: str) -> None:
    m = model(length_cap)
    assert m.tree.multi_turn
    assert float(m.prob.sum()) == pytest.approx(1.0, abs=TOL)
    pol = policy()
    pol.double()
    j = brute_force_J(pol, length_cap)
    (grad,) = torch.autograd.grad(j, pol.logits)
    assert abs(m.J - float(j.detach())) < TOL
    assert float((m.grad_J - grad.reshape(-1)).abs().max()) < TOL


def test_tree_follows_the_reply_protocol() -> None:
    m = model()
    tr = m.tree
    assert tr.describe().startswith(f"{tr.num_responses} responses")
    assert 0 < int(tr.chance.sum()) < tr.num_nodes and not tr.forced.any()
    # chance rows are probability laws; the one after "EOS a" is random again (ab or aa)
    rows = tr.env_prob[tr.chance]
    assert torch.allclose(rows.sum(1), torch.ones(len(rows), dtype=torch.float64), atol=TOL)
    node = tr.node_index(0, (EOS, A))
    assert bool(tr.chance[node])
    assert tr.env_prob[node].tolist() == pytest.approx([0.0, 2 / 3, 1 / 3], abs=TOL)
    assert tr.env_prob[tr.node_index(0, (EOS,))].tolist() == pytest.approx([0, 0.75, 0.25])
    assert not bool(tr.chance[tr.node_index(0, (EOS, B))])  # the reply "b" is complete
    for r, (_, toks) in enumerate(tr.responses):
        n = len(toks)
        state = replay_turns(
            reply_fn,
            prompt_index=0,
            prompt_ids=PROMPT,
            response_ids=toks,
            eos_token_id=EOS,
            tokenizer=TOK,
            max_turns=MAX_TURNS,
        )
        assert tr.policy_mask[r, :n].tolist() == list(state.policy_mask)
        assert state.ended or n == HORIZON
        # the cap right after a turn's EOS: the random reply never starts, the response
        # stops at a chance node
        cut_at_eos = n == HORIZON and toks[-1] == EOS and toks.count(EOS) < MAX_TURNS
        assert bool(state.undecided) == (cut_at_eos and len(state.pending) == 0)
        chance = ~tr.policy_mask[r, :n]
        env_p = tr.env_prob.reshape(-1)[tr.pair[r, :n][chance]].prod()
        if not state.pending:  # a reply cut by the cap counts its outcome's first tokens only
            assert float(env_p) == pytest.approx(state.probability, abs=TOL)
    # P(W) factorises: the policy's probabilities times the environment's
    pol_lp = m.log_pi.reshape(-1)[tr.pair].masked_fill(~tr.policy_mask, 0.0).sum(1)
    env_p = tr.env_prob.reshape(-1)[tr.pair].masked_fill(tr.policy_mask | ~tr.mask, 1.0).prod(1)
    assert torch.allclose(m.prob, pol_lp.exp() * env_p, atol=TOL, rtol=0)


def test_injected_tokens_carry_no_gradient_and_values_average_over_replies() -> None:
    m = model()
    tr = m.tree
    score = m.score.view(tr.num_nodes, tr.num_actions, -1)
    assert float(score[tr.chance].abs().max()) == 0.0
    assert float(score[~tr.chance].abs().max()) > 0.1
    # on every response, the score of the trajectory is the policy tokens' sum
    all_tokens = m.score[tr.pair.masked_fill(~tr.mask, 0)].masked_fill(~tr.mask[..., None], 0)
    mine = all_tokens.masked_fill(~tr.policy_mask[..., None], 0.0)
    assert torch.equal(all_tokens.sum(1), mine.sum(1))
    # V by backward recursion (ZRA values) = E[RM | s] by enumeration, chance nodes included
    v = m.zra_values()
    assert float((v - m.U).abs().max()) < TOL
    # Q(s, EOS) of a turn the environment answers = V of the chance node it leads to
    root = tr.node_index(0, ())
    assert float(m.Q[root, tr.eos_index]) == pytest.approx(float(m.V[tr.node_index(0, (EOS,))]))


def test_aggregation_counts_the_policy_tokens_only() -> None:
    m = model()
    tr = m.tree
    r = tr.response_index(0, (EOS, A, A, A, EOS, B))  # 3 policy tokens, 3 injected
    spec = EstimatorSpec("reinforce", aggregation="seq-mean-token-mean")
    coef = m.draw_coefficients(torch.tensor([[r]]), spec)[0]
    pairs = tr.pair[r, : int(tr.lengths[r])]
    expected = torch.zeros(tr.num_pairs, dtype=torch.float64)
    expected[pairs[tr.policy_mask[r, : len(pairs)]]] = float(m.rewards[r]) / 3
    assert torch.allclose(coef, expected, atol=TOL, rtol=0)


def test_trepo_runs_over_decision_states_as_the_agent_does() -> None:
    m = model()
    tr = m.tree
    rows = torch.arange(tr.num_responses)
    nodes, n, columns = m.state_view(rows)
    assert torch.equal(n, tr.policy_mask.sum(1))
    valid = torch.arange(HORIZON)[None, :] < n[:, None]
    assert not tr.chance[nodes[valid]].any()  # never a prefix inside a reply
    assert torch.equal(tr.node_of.gather(1, columns.clamp(max=HORIZON - 1))[valid], nodes[valid])
    assert bool(tr.policy_mask.gather(1, columns.clamp(max=HORIZON - 1))[valid].all())
    spec = EstimatorSpec("trepo", inputs=InputSpec(prefix_values="exact"))
    adv = m.advantages(rows, spec)
    assert float(adv.masked_fill(tr.policy_mask, 0.0).abs().max()) == 0.0
    # V(next decision state) - V(s_t): the weights of the policy's tokens telescope to
    # RM(W) - V(prompt), the environment's luck included (credited to the turn's EOS)
    assert torch.allclose(adv.sum(1), m.rewards - m.prompt_value[0], atol=TOL, rtol=0)
    r = tr.response_index(0, (EOS, A, A, A, EOS, B))
    after_reply = m.U[tr.node_index(0, (EOS, A, A))]
    assert float(adv[r, 0]) == pytest.approx(float(after_reply - m.U[tr.node_index(0, ())]))


def test_multi_turn_tables_need_gamma_one() -> None:
    with pytest.raises(ValueError, match=r"gamma=0\.9 on a multi-turn tree"):
        ExactModel(policy(), model().tree, token_rewards=model().r_table, gamma=0.9)


@pytest.mark.parametrize("seed", [0, 1])
def test_every_registered_estimator_is_exact_on_a_random_reply_tree(seed: int) -> None:
    m = echo_setup(horizon=4, seed=seed)
    ref = make_policy("tabular", 4, seed + 1, multi_turn=True)
    rep = verify(model=m, group_size=2, rollouts=(1, 2), anchors=(1, 2), ref_policy=ref)
    assert rep.passed, [r.estimator for r in rep.rows if r.passed is False]
    rows = {r.estimator: r for r in rep.rows}
    scale = max(1.0, float(m.grad_J.abs().max()))
    for name in (
        "RLOO G=2",
        "Thm 2: V(s_t+1) - V(s_t) (28)",
        "Thm 2 via trepo(exact V)",
        "TRePO all K=1",
        "TRePO all K=2",
        "ReMax G=2",
        "REINFORCE: RM(W) (21)",
        "PPO, exact critic [gae, lam=1]",
    ):
        assert rows[name].method != "monte-carlo", name
        assert rows[name].max_abs_error < 1e-12 * scale, name
    assert float(m.grad_J.abs().max()) > 1e-3  # a real gradient, not 0 = 0
    # every registered advantage estimator ran on the tree (ones theory has no verdict on
    # with "?"); every theory verdict held: unbiased, scaled by its factor, or biased
    assert {r.registry for r in rep.rows if r.registry} == set(ADVANTAGE_ESTIMATORS)
    assert sum(r.expected == "unbiased" for r in rep.rows) >= 13
    assert all(r.passed for r in rep.rows if r.expected != "?")
    assert rep.kl and all(k.passed for k in rep.kl)


def test_off_policy_sequence_ratio_is_unbiased_on_a_multi_turn_tree() -> None:
    m = echo_setup(horizon=4, seed=2)
    om = OffPolicyModel(m, make_behavior(m, "temperature", temperature=1.5))
    chance = m.tree.chance
    assert torch.equal(om.behavior.log_mu[chance], m.log_pi[chance])  # mu never replies
    assert om.compare(om.moments(OffPolicySpec())).relative_error > 0.02
    mom = om.moments(OffPolicySpec(correction="seq_tis"))
    assert float((mom.mean - m.grad_J).abs().max()) < TOL


@pytest.mark.parametrize("horizon", [4, 5])
def test_echo_setup_values(horizon: int) -> None:
    for p in (0.3, 0.7):
        uniform = echo_setup(p=p, horizon=horizon, init_scale=0.0)
        assert abs(uniform.J - (1 - (2 / 3) ** (horizon - 3)) / 9) < TOL
    m = echo_setup(horizon=horizon, init_scale=0.0)
    pol = m.policy
    with torch.no_grad():  # the optimum: end turn 1 at once, then echo the reply
        for prefix, token in [((), EOS), ((EOS, A), A), ((EOS, A, A), EOS)]:
            pol.logits[pol.node_index((A,), prefix), token] = 30.0
        for prefix, token in [((EOS, B), B), ((EOS, B, B), EOS)]:
            pol.logits[pol.node_index((A,), prefix), token] = 30.0
    best = ExactModel(pol, m.tree, rewards=m.rewards)
    assert abs(best.J - 1.0) < 1e-10
    assert float(best.greedy_reward[0]) == pytest.approx(1.0)


def test_single_turn_tree_has_no_chance_node() -> None:
    tr = enumerate_tree([PROMPT], ACTIONS, EOS, 4, "force-eos")
    assert not tr.multi_turn and torch.equal(tr.policy_mask, tr.mask)
    assert torch.equal(tr.fixed, tr.forced)


def test_reply_tokens_must_be_tree_actions() -> None:
    with pytest.raises(ValueError, match=r"tokens \[2\] are not among the tree's actions"):
        enumerate_tree([PROMPT], (EOS, A), EOS, 4, reply_fn=lambda turn: [B], tokenizer=TOK)


def test_verify_cli_runs_the_echo_setup(capsys: pytest.CaptureFixture[str]) -> None:
    assert set(verify_cli.SETUPS) == set(SETUPS)
    args = ["verify", "--setup", "echo", "--horizon", "4", "--group-size", "2", "--no-kl"]
    assert main([*args, "--length-cap", "env"]) == 0
    assert "llm-mdp verify (echo)" in capsys.readouterr().out
    assert main([*args, "--gamma", "0.9"]) == 2
    assert "gamma must be 1" in capsys.readouterr().err


def test_a_transformer_policy_reads_the_replies_and_stays_exact() -> None:
    m = echo_setup(horizon=4, policy="gpt2", seed=3)
    assert abs(float(m.prob.sum()) - 1.0) < TOL
    # the policy conditions on the reply: its next-token law differs after "a" and "b"
    after_a, after_b = (m.tree.node_index(0, (EOS, t)) for t in (A, B))
    assert float((m.pi[after_a] - m.pi[after_b]).abs().max()) > 1e-3
    scale = max(1.0, float(m.grad_J.abs().max()))
    for spec in (
        EstimatorSpec("rloo", group_size=2),
        EstimatorSpec("trepo", inputs=InputSpec(prefix_values="exact")),
    ):
        assert float((m.moments(spec).mean - m.grad_J).abs().max()) < 1e-12 * scale
