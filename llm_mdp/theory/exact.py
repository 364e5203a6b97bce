"""Exact ``J``, ``grad J``, values and estimator moments of a small policy, by enumeration.

:class:`ExactModel` ties a policy (any :class:`~llm_mdp.policies.Policy`: the tabular one
or a Hugging Face causal LM), a :class:`~llm_mdp.theory.tree.ResponseTree` and token
rewards together and computes, in float64:

* ``P(W)``, ``RM(W) = sum_t gamma^(t-1) r_t``, ``J = E RM(W)`` and ``grad J`` by autograd
  over the enumeration (w.r.t. every trainable parameter of the policy, flattened);
* ``V(s)`` and ``Q(s, w)`` of every node (MDP values of the token rewards with discount
  ``gamma``) and ``U(s) = E[RM(W) | W passes through s]``, the value "in response-level
  units" of the paper: ``U(s_t) = sum_{k<t} gamma^(k-1) r_k + gamma^(t-1) V(s_t)``;
* the per-sample gradient of any estimator: ``g = sum_t A_t grad log pi(w_t | s_t)``.
  Every such ``g`` is ``S^T a`` where ``S`` is the ``(n_pairs, P)`` matrix of score vectors
  ``grad log pi(w | s)`` of the (state, action) pairs and ``a`` the per-pair coefficient
  vector of one draw, so mean and covariance of ``g`` follow exactly from those of ``a``:
  ``E g = S^T E a`` and ``tr Cov g = <S S^T, Cov a>``. This keeps group enumeration cheap
  for transformer policies too.

Estimators are taken from the registry (:mod:`llm_mdp.estimators`) by name and described
by an :class:`EstimatorSpec`; :meth:`ExactModel.moments` evaluates one by enumerating
every ordered group of ``G`` responses (as multisets with multinomial weights when the
estimator is exchangeable) when that is cheap, or by a seeded Monte Carlo estimate with
standard errors otherwise. TRePO's Monte Carlo value estimates are handled in closed
form (every anchor set enumerated, the rollout noise through its exact variance).
Theory weightings that need exact values (Lemma 1, Lemma 2, Theorem 1 and 2) are in
:data:`THEORY_WEIGHTINGS`.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from llm_mdp import estimators as est
from llm_mdp.estimators import AdvantageInputs

from .tree import ResponseTree, enumerate_tree

__all__ = [
    "ALL_EXACT",
    "THEORY_WEIGHTINGS",
    "Comparison",
    "EstimatorSpec",
    "ExactModel",
    "GradientMoments",
    "InputSpec",
    "compare",
]

F64 = torch.float64

TokenRewardFn = Callable[[tuple[int, ...], tuple[int, ...], int], float]
"""``r(prompt, prefix, token)``: the true reward of emitting ``token`` after ``prefix``."""
ResponseRewardFn = Callable[[tuple[int, ...], tuple[int, ...]], float]
"""``RM(prompt, response)``: a response-level reward (Zero-Reward Assumption set-up)."""


# ----------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class InputSpec:
    """Which optional :class:`~llm_mdp.estimators.AdvantageInputs` fields to fill, and how.

    Attributes:
        baseline: ``None``; ``"greedy"``: the reward of the exact greedy response to the
            prompt (ReMax); ``"value"``: the exact ``V(prompt)`` (REINFORCE + baseline).
        token_rewards: ``None``; ``"true"``: the true token rewards ``r_t``; ``"zra"``:
            ``RM(W)`` on the last token (:func:`~llm_mdp.estimators.zra_token_rewards`).
        values: ``None``; ``"exact"``: the exact ``V(s_t)`` of the chosen token rewards and
            ``gamma`` (a perfect critic); ``"zero"``: no critic.
        prefix_values: ``None``; ``"exact"``: exact ``U(s_t)`` at every position, all known;
            ``"mc"``: TRePO's Monte Carlo estimates (paper-notes section 4, as
            :class:`~llm_mdp.agents.trepo.TRePO` builds them): the mean ``RM`` of
            ``rollouts`` fresh completions of the prefix, at the anchors' columns.
        rollouts: ``K``, completions per estimated value (``prefix_values="mc"``).
        anchors: ``m`` anchor positions drawn uniformly without replacement from ``1..T``
            (all when ``m >= T``); ``None``: every position (the unbiased all-positions
            estimator).
        anchor_columns: ``"pair"`` (default, section 4 item 2 and the agent): an anchor
            ``t`` estimates ``V(s_t)`` and ``V(s_{t+1})``; ``"state"``: ``V(s_t)`` only.
        value_estimates: ``"shared"`` (adjacent anchors reuse one estimate per prefix) or
            ``"fresh"`` (``V(s_{t+1})`` of an anchor gets its own rollouts, passed as
            ``next_values``), as the agent's option of the same name.
        root_rollouts: completions behind ``V_hat(s_1)``, always estimated (item 3);
            ``None`` means ``rollouts``. The agent uses the leave-one-out mean of the
            ``G - 1`` other responses of the group, which for one response has the law of
            ``root_rollouts = G - 1``.
    """

    baseline: str | None = None
    token_rewards: str | None = None
    values: str | None = None
    prefix_values: str | None = None
    rollouts: int = 1
    anchors: int | None = None
    anchor_columns: str = "pair"
    value_estimates: str = "shared"
    root_rollouts: int | None = None

    def __post_init__(self) -> None:
        allowed: dict[str, tuple[str | None, ...]] = {
            "baseline": (None, "greedy", "value"),
            "token_rewards": (None, "true", "zra"),
            "values": (None, "exact", "zero"),
            "prefix_values": (None, "exact", "mc"),
            "anchor_columns": ("pair", "state"),
            "value_estimates": ("shared", "fresh"),
        }
        for name, options in allowed.items():
            if getattr(self, name) not in options:
                raise ValueError(
                    f"InputSpec.{name} must be one of {options}, got {getattr(self, name)!r}"
                )
        if self.rollouts < 1:
            raise ValueError(f"InputSpec.rollouts must be >= 1, got {self.rollouts}")
        if self.root_rollouts is not None and self.root_rollouts < 1:
            raise ValueError(f"InputSpec.root_rollouts must be >= 1, got {self.root_rollouts}")
        if self.anchors is not None and self.anchors < 1:
            raise ValueError(f"InputSpec.anchors must be >= 1 or None, got {self.anchors}")
        if self.values is not None and self.token_rewards is None:
            raise ValueError("InputSpec.values needs token_rewards ('true' or 'zra')")


ALL_EXACT = InputSpec(baseline="greedy", token_rewards="zra", values="exact", prefix_values="exact")
"""Every optional input, exact: the default for estimators the toolkit knows nothing about."""


@dataclass(frozen=True)
class EstimatorSpec:
    """A registered advantage estimator plus everything needed to evaluate it.

    Attributes:
        name: key in :data:`llm_mdp.estimators.ADVANTAGE_ESTIMATORS`.
        options: keyword options of the estimator (e.g. ``{"std_scaling": "none"}``).
        group_size: ``G`` responses per draw (one prompt).
        inputs: which optional inputs to fill (:class:`InputSpec`).
        aggregation: an :data:`~llm_mdp.estimators.AGGREGATION_MODES` name; the draw's
            gradient is ``grad aggregate(A * logp, mask, aggregation)``.
        label: display name (default: ``name`` and options).
        expected: what theory predicts: ``"unbiased"``, ``"scaled"`` (by
            ``expected_scale``), ``"biased"`` or ``"?"``.
        expected_scale: ``E g = expected_scale * grad J`` when ``expected == "scaled"``.
        group_local: the estimator is a function of each group alone (true for every
            built-in except ``grpo`` with ``std_scaling="batch"``), so many groups can be
            evaluated in one call. ``None``: test it numerically.
    """

    name: str
    options: Mapping[str, Any] = field(default_factory=dict)
    group_size: int = 1
    inputs: InputSpec = field(default_factory=InputSpec)
    aggregation: str = "seq-mean-token-sum"
    label: str = ""
    expected: str = "?"
    expected_scale: float | None = None
    group_local: bool | None = None

    @property
    def display(self) -> str:
        if self.label:
            return self.label
        opts = ", ".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.name}({opts})" if opts else self.name


@dataclass(frozen=True, eq=False)
class GradientMoments:
    """Mean and covariance of one draw's gradient estimate ``g = S^T a``.

    Attributes:
        mean: ``(P,)`` ``E g`` (exact, or the Monte Carlo mean).
        trace_cov: ``tr Cov g`` of one draw (a draw = ``n_responses`` responses).
        n_responses: responses per draw (``G`` for group estimators, else 1).
        method: ``"exact"``, ``"enumerated"`` (every ordered group) or ``"monte-carlo"``.
        num_draws: groups enumerated or Monte Carlo samples (``None`` for closed forms).
        stderr: ``(P,)`` Monte Carlo standard error of ``mean`` (``None`` when exact).
        pair_mean: ``(n_pairs,)`` ``E a``.
        pair_cov: ``(n_pairs, n_pairs)`` ``Cov a``.
    """

    mean: Tensor
    trace_cov: float
    n_responses: int
    method: str
    num_draws: int | None
    stderr: Tensor | None
    pair_mean: Tensor
    pair_cov: Tensor


@dataclass(frozen=True)
class Comparison:
    """An expected gradient against the true one.

    Attributes:
        max_abs_error: ``max |E g - grad J|``.
        relative_error: ``|E g - grad J| / |grad J|`` (Euclidean norms).
        cosine: cosine of ``E g`` and ``grad J``.
        projection: ``<E g, grad J> / |grad J|^2`` (1 when unbiased, ``(G-1)/G`` for GRPO
            mean-only).
        z_max: Monte Carlo only: ``max |E g - grad J| / stderr`` over components with a
            positive standard error (a z-test; about 4 or less when unbiased).
    """

    max_abs_error: float
    relative_error: float
    cosine: float
    projection: float
    z_max: float | None = None


def compare(mean: Tensor, target: Tensor, stderr: Tensor | None = None) -> Comparison:
    """Compare an expected gradient ``mean`` with ``target`` (both ``(P,)``)."""
    diff = mean - target
    tn = float(target.norm())
    mn = float(mean.norm())
    dot = float(mean @ target)
    z = None
    if stderr is not None:
        ok = stderr > 1e-12 * max(1.0, float(target.abs().max()))
        z = float((diff[ok].abs() / stderr[ok]).max()) if bool(ok.any()) else 0.0
    return Comparison(
        max_abs_error=float(diff.abs().max()),
        relative_error=float(diff.norm()) / tn if tn > 0 else math.inf,
        # a zero expectation (e.g. k1 in the loss) has no direction: cosine 0
        cosine=dot / (mn * tn) if mn > 1e-12 * tn and tn > 0 else 0.0,
        projection=dot / tn**2 if tn > 0 else math.inf,
        z_max=z,
    )


# ----------------------------------------------------------------------------- helpers


def _as_f64_policy(policy: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``policy`` itself if its parameters already have ``dtype``, else a converted copy."""
    if all(p.dtype == dtype for p in policy.parameters()):
        return policy
    return copy.deepcopy(policy).to(dtype)


def _node_log_probs(policy: Any, tree: ResponseTree, device: torch.device) -> Tensor:
    """``(n_nodes, A)`` log pi(w | s) renormalised over ``tree.actions``, differentiable.

    One teacher-forced ``policy.log_probs`` call over every (free node, action) sequence;
    forced nodes (``"force-eos"``) get log-prob 0 for EOS and ``-inf`` elsewhere.
    """
    a_n = tree.num_actions
    free = (~tree.forced).nonzero().squeeze(1).tolist()
    width = max(len(p) for p in tree.prompts)
    h = tree.horizon
    pad = tree.eos_token_id
    rows_ids, rows_mask, cols = [], [], []
    for n in free:
        k, prefix = tree.nodes[n]
        prompt = tree.prompts[k]
        for a in tree.actions:
            resp = [*prefix, a]
            rows_ids.append(
                [pad] * (width - len(prompt)) + list(prompt) + resp + [pad] * (h - len(resp))
            )
            rows_mask.append(
                [0] * (width - len(prompt))
                + [1] * len(prompt)
                + [1] * len(resp)
                + [0] * (h - len(resp))
            )
            cols.append(len(prefix))
    ids = torch.tensor(rows_ids, dtype=torch.long, device=device)
    mask = torch.tensor(rows_mask, dtype=torch.long, device=device)
    lp = policy.log_probs(ids, mask, width)  # in the parameters' precision (float64 here)
    lp = lp[torch.arange(len(cols), device=device), torch.tensor(cols, device=device)]
    lp = lp.to(F64).view(len(free), a_n)
    lp = lp - torch.logsumexp(lp, dim=1, keepdim=True)
    table = torch.full((tree.num_nodes, a_n), -math.inf, dtype=F64, device=device)
    table[tree.forced.to(device), tree.eos_index] = 0.0
    return table.index_put((torch.tensor(free, dtype=torch.long, device=device),), lp)


def _flat_grad(out: Tensor, params: Sequence[Tensor], retain: bool = True) -> Tensor:
    grads = torch.autograd.grad(out, list(params), retain_graph=retain, allow_unused=True)
    return torch.cat(
        [
            (g if g is not None else torch.zeros_like(p)).reshape(-1).to(F64).cpu()
            for g, p in zip(grads, params, strict=True)
        ]
    )


def _values(r: Tensor, probs: Tensor, tree: ResponseTree, gamma: float) -> tuple[Tensor, Tensor]:
    """MDP ``V (n_nodes,)`` and ``Q (n_nodes, A)`` of token rewards ``r`` by backward recursion."""
    v = torch.zeros(tree.num_nodes, dtype=F64)
    q = torch.zeros_like(r)
    child = tree.child
    for d in range(tree.horizon - 1, -1, -1):
        rows = (tree.node_depth == d).nonzero().squeeze(1)
        if not len(rows):
            continue
        ch = child[rows]
        nxt = torch.where(ch >= 0, v[ch.clamp(min=0)], torch.zeros((), dtype=F64))
        q[rows] = r[rows] + gamma * nxt
        v[rows] = (probs[rows] * q[rows]).sum(1)
    return v, q


def _scatter_pairs(coef: Tensor, pairs: Tensor, n_pairs: int) -> Tensor:
    """``(n, n_pairs)`` dense coefficients from ``(n, L)`` weights at ``(n, L)`` pair indices."""
    out = torch.zeros(coef.shape[0], n_pairs, dtype=F64)
    return out.scatter_add_(1, pairs, coef.to(F64))


def _groups(n: int, g: int, multisets: bool, step: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Chunks of ``(digits (m, G), count (m,))``: every ordered group of ``G`` out of ``n``
    (count 1), or every multiset with its number of orderings ``G! / prod(mult!)``."""
    if not multisets:
        base = n ** torch.arange(g - 1, -1, -1)
        for start in range(0, n**g, step):
            code = torch.arange(start, min(n**g, start + step))
            yield (code[:, None] // base[None, :]) % n, torch.ones(len(code), dtype=F64)
        return
    combos = itertools.combinations_with_replacement(range(n), g)
    while chunk := list(itertools.islice(combos, step)):
        digits = torch.tensor(chunk, dtype=torch.long)
        mult = torch.zeros(len(chunk), n, dtype=F64).scatter_add_(
            1, digits, torch.ones(digits.shape, dtype=F64)
        )
        count = torch.exp(math.lgamma(g + 1) - torch.lgamma(mult + 1).sum(1)).round()
        yield digits, count


@dataclass
class _Layout:
    """Value estimates of TRePO rows (see :meth:`ExactModel._anchor_layout`)."""

    known: Tensor  # (b, H+1) prefix_known
    before: Tensor  # (b, H+1) columns with a first estimate (col 0 always)
    after: Tensor  # (b, H+1) columns V(s_{t+1}) of anchors ("pair")
    fresh: bool
    active: Tensor  # (b, 2H) slots that exist
    var: Tensor  # (b, 2H) variance of each slot (0 when inactive)


# ----------------------------------------------------------------------------- model


class ExactModel:
    """Exact quantities of ``policy`` on ``tree`` with token rewards ``r(s, w)``.

    Args:
        policy: a policy with ``log_probs(input_ids, attention_mask, prompt_width)`` (the
            :class:`~llm_mdp.policies.Policy` protocol), renormalised over ``tree.actions``.
            Converted to float64 (a copy) unless it already is; ``log_probs`` keeps that
            precision, so exact identities hold to ~1e-16.
        tree: the enumeration (:func:`~llm_mdp.theory.tree.enumerate_tree`).
        token_rewards: ``(n_nodes, A)`` true reward of each (state, action) pair; ``RM(W)``
            is then ``sum_t gamma^(t-1) r_t``. ``None``: Zero-Reward Assumption from
            ``rewards`` (then ``gamma`` must be 1).
        rewards: ``(N,)`` ``RM(W)`` per response; checked against the token rewards when
            both are given.
        gamma: discount in ``(0, 1]``.

    Attributes:
        params: the trainable parameters ``grad J`` is taken w.r.t. (flattened in order).
        log_pi: ``(n_nodes, A)`` detached log-probs; ``pi`` the probabilities.
        score: ``S``, ``(n_pairs, P)`` rows ``grad log pi(w | s)`` (0 for forced nodes).
        prob: ``(N,)`` probability of each response (prompts uniform).
        rewards: ``(N,)`` ``RM(W)``. ``token_rewards``: ``(N, H)`` ``r_t`` on positions.
        r_table: ``(n_nodes, A)``; ``V``: ``(n_nodes,)``; ``Q``: ``(n_nodes, A)``.
        U: ``(n_nodes,)`` ``E[RM | s]``; ``prefix_values``: ``(N, H + 1)`` ``U(s_1..s_{T+1})``
            with ``U(s_{T+1}) = RM(W)`` (and ``RM`` beyond ``T``).
        J: float. ``grad_J``: ``(P,)``.
        greedy_reward: ``(n_prompts,)`` ``RM`` of the greedy response of each prompt.
        prompt_value: ``(n_prompts,)`` ``V(prompt) = U(root)``.
        zra: the token rewards were built from ``rewards`` by the Zero-Reward Assumption.
        within: ``(n_nodes, N)`` ``P(W | s)``; ``reward_var``: ``(n_nodes,)`` ``Var(RM | s)``.
    """

    def __init__(
        self,
        policy: Any,
        tree: ResponseTree,
        *,
        token_rewards: Tensor | None = None,
        rewards: Tensor | None = None,
        gamma: float = 1.0,
    ) -> None:
        if not 0.0 < gamma <= 1.0:
            raise ValueError(f"gamma must be in (0, 1], got {gamma}")
        self.tree = tree
        self.gamma = float(gamma)
        self.policy = _as_f64_policy(policy, F64)
        self.device = next(self.policy.parameters()).device
        self.params = [p for p in self.policy.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError(
                "the policy has no trainable parameter (requires_grad=False everywhere)"
            )
        self.num_params = sum(p.numel() for p in self.params)
        tr = tree
        n, h, a_n = tr.num_responses, tr.horizon, tr.num_actions
        disc = torch.tensor([gamma**t for t in range(h)], dtype=F64)
        self.discounts = disc
        # ---- rewards
        if token_rewards is None:
            if rewards is None:
                raise ValueError("give token_rewards (n_nodes, A) or rewards (N,)")
            if gamma != 1.0:
                raise ValueError(
                    f"gamma={gamma} with response-level rewards only (Zero-Reward Assumption): "
                    "RM(W) is then not sum_t gamma^(t-1) r_t; eq. (26) says use gamma = 1. "
                    "Give true token_rewards to study gamma < 1."
                )
            rm = torch.as_tensor(rewards, dtype=F64).reshape(-1)
            if rm.shape != (n,):
                raise ValueError(f"rewards must have shape ({n},), got {tuple(rm.shape)}")
            table = torch.zeros(tr.num_nodes * a_n, dtype=F64)
            last = tr.pair.gather(1, (tr.lengths - 1)[:, None]).squeeze(1)
            table[last] = rm
            token_rewards = table.view(tr.num_nodes, a_n)
            self.zra = True
        else:
            self.zra = False
        r_table = torch.as_tensor(token_rewards, dtype=F64)
        if r_table.shape != (tr.num_nodes, a_n):
            raise ValueError(
                f"token_rewards must have shape (n_nodes, A) = {(tr.num_nodes, a_n)}, "
                f"got {tuple(r_table.shape)}"
            )
        r_table = r_table.masked_fill(tr.forced[:, None] & (torch.arange(a_n) != tr.eos_index), 0.0)
        self.r_table = r_table
        tok_r = r_table.reshape(-1)[tr.pair].masked_fill(~tr.mask, 0.0)
        self.token_rewards = tok_r
        rm_tok = (tok_r * disc).sum(1)
        if rewards is not None:
            rm = torch.as_tensor(rewards, dtype=F64).reshape(-1)
            err = float((rm - rm_tok).abs().max())
            if err > 1e-9 * max(1.0, float(rm.abs().max())):
                raise ValueError(
                    f"RM(W) differs from sum_t gamma^(t-1) r_t by up to {err:.3g} (gamma={gamma}); "
                    "the token rewards, the response rewards and gamma must agree (Theorem 1 set-up)"
                )
        self.rewards = rm_tok
        # ---- policy tables
        self._log_pi_graph = _node_log_probs(self.policy, tr, self.device).cpu()
        self.log_pi = self._log_pi_graph.detach()
        self.pi = self.log_pi.exp()
        n_prompts = len(tr.prompts)
        flat = self._log_pi_graph.reshape(-1)
        resp_logp = flat[tr.pair].masked_fill(~tr.mask, 0.0).sum(1)
        self._prob_graph = resp_logp.exp() / n_prompts
        self.prob = self._prob_graph.detach()
        self.J_tensor = (self._prob_graph * self.rewards).sum()
        self.J = float(self.J_tensor.detach())
        self.grad_J = _flat_grad(self.J_tensor, self.params)
        self.score = self._score_matrix(flat)
        self.gram = self.score @ self.score.T
        # ---- values
        self.V, self.Q = _values(r_table, self.pi, tr, gamma)
        within = torch.zeros(tr.num_nodes, n, dtype=F64)  # P(W | s)
        p_node = torch.zeros(tr.num_nodes, dtype=F64)
        for node in range(tr.num_nodes):
            idx = tr.passes[node]
            mass = self.prob[idx].sum()
            p_node[node] = mass
            if mass > 0:
                within[node, idx] = self.prob[idx] / mass
        self.node_prob = p_node
        self.within = within
        self.U = within @ self.rewards
        self.reward_var = (within @ self.rewards**2 - self.U**2).clamp(min=0.0)
        u_cols = torch.cat([self.U[tr.node_of], self.rewards[:, None]], dim=1)
        pos = torch.arange(h + 1)[None, :]
        self.prefix_values = torch.where(pos < tr.lengths[:, None], u_cols, self.rewards[:, None])
        roots = [tr.node_index(k, ()) for k in range(n_prompts)]
        self.prompt_value = self.V[roots]
        self.greedy_reward = torch.tensor(
            [float(self.rewards[self._greedy(root)]) for root in roots], dtype=F64
        )

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_functions(
        cls,
        policy: Any,
        prompts: Sequence[Sequence[int]],
        actions: Sequence[int],
        eos_token_id: int,
        horizon: int,
        *,
        length_cap: str = "env",
        token_reward: TokenRewardFn | None = None,
        reward: ResponseRewardFn | None = None,
        gamma: float = 1.0,
    ) -> ExactModel:
        """Build from plain Python reward functions over token ids.

        ``token_reward(prompt, prefix, token)`` gives true token rewards (any ``gamma``);
        ``reward(prompt, response)`` a response-level ``RM`` (ZRA, ``gamma = 1``). Give one
        (or both, to have them checked against each other).
        """
        tree = enumerate_tree(prompts, actions, eos_token_id, horizon, length_cap)
        r_table = None
        if token_reward is not None:
            r_table = torch.zeros(tree.num_nodes, tree.num_actions, dtype=F64)
            for i, (k, prefix) in enumerate(tree.nodes):
                for j, a in enumerate(tree.actions):
                    if tree.forced[i] and a != tree.eos_token_id:
                        continue
                    r_table[i, j] = float(token_reward(tree.prompts[k], prefix, a))
        rm = None
        if reward is not None:
            rm = torch.tensor(
                [float(reward(tree.prompts[k], toks)) for k, toks in tree.responses], dtype=F64
            )
        return cls(policy, tree, token_rewards=r_table, rewards=rm, gamma=gamma)

    @classmethod
    def from_task(
        cls,
        policy: Any,
        task: Any,
        *,
        horizon: int | None = None,
        length_cap: str = "env",
        actions: Sequence[int] | None = None,
        prompts: Sequence[str] | None = None,
        gamma: float | None = None,
    ) -> ExactModel:
        """Build from a :class:`~llm_mdp.tasks.Task` (its prompts, tokenizer and rewards).

        ``actions`` default: the task's legal actions (``task.action_mask``); ``horizon`` default:
        ``task.max_response_tokens``; ``gamma`` default: ``task.gamma``. Token rewards come
        from ``task.token_reward_fn`` when the task has one (checked to be a function of
        (prefix, token) and to sum to ``RM``), else ZRA from ``task.reward_fn``.
        """
        from llm_mdp.tasks.base import ResponseBatch

        tok = task.tokenizer
        eos, pad = int(tok.eos_token_id), int(tok.pad_token_id)
        legal = task.action_mask.tolist()  # the env's action set (tasks.illegal_action_ids)
        acts = list(actions) if actions is not None else [i for i, ok in enumerate(legal) if ok]
        if any(not 0 <= a < len(legal) or not legal[a] for a in acts):
            raise ValueError(f"actions {acts} include ids that are not legal actions of the task")
        texts = list(prompts) if prompts is not None else list(task.prompts)
        prompt_ids = [list(tok(p, add_special_tokens=False).input_ids) for p in texts]
        h = int(horizon if horizon is not None else task.max_response_tokens)
        if h > task.max_response_tokens:
            raise ValueError(
                f"horizon={h} exceeds the task's max_response_tokens={task.max_response_tokens}"
            )
        g = float(task.gamma if gamma is None else gamma)
        tree = enumerate_tree(prompt_ids, acts, eos, h, length_cap)
        width = max(len(p) for p in tree.prompts)
        pids = torch.full((tree.num_responses, width), pad, dtype=torch.long)
        pmask = torch.zeros_like(pids)
        for i, (k, _) in enumerate(tree.responses):
            p = tree.prompts[k]
            pids[i, width - len(p) :] = torch.tensor(p)
            pmask[i, width - len(p) :] = 1
        batch = ResponseBatch(
            prompt_ids=pids,
            prompt_mask=pmask,
            response_ids=tree.tokens.masked_fill(~tree.mask, pad),
            response_mask=tree.mask.long(),
            prompt_indices=tree.resp_prompt.clone()
            if prompts is None
            else torch.full_like(tree.resp_prompt, -1),
            tokenizer=tok,
        )
        rm = task.score(batch)
        tok_r = task.true_token_rewards(batch)
        r_table = None
        if tok_r is not None:
            r_table = torch.zeros(tree.num_pairs, dtype=F64)
            pairs, vals = tree.pair[tree.mask], tok_r.to(F64)[tree.mask]
            r_table[pairs] = vals  # every pair is on some response; duplicates must agree
            spread = (vals - r_table[pairs]).abs().max()
            if float(spread) > 1e-12:
                raise ValueError(
                    "the task's token rewards are not a function of (prompt, prefix, token) alone"
                )
            r_table = r_table.view(tree.num_nodes, tree.num_actions)
        return cls(policy, tree, token_rewards=r_table, rewards=rm, gamma=g)

    # ---------------------------------------------------------------- internals
    def _score_matrix(self, flat_log_pi: Tensor) -> Tensor:
        """``(n_pairs, P)``: row ``k`` is ``grad log pi`` of pair ``k`` (0 if constant)."""
        rows = torch.zeros(self.tree.num_pairs, self.num_params, dtype=F64)
        live = [
            k
            for k in range(self.tree.num_pairs)
            if flat_log_pi[k].requires_grad and math.isfinite(float(flat_log_pi[k].detach()))
        ]
        if not live:
            return rows
        idx = torch.tensor(live)
        sub = flat_log_pi[idx]
        try:
            eye = torch.eye(len(live), dtype=sub.dtype, device=sub.device)
            grads = torch.autograd.grad(
                sub,
                self.params,
                grad_outputs=eye,
                retain_graph=True,
                is_grads_batched=True,
                allow_unused=True,
            )
            flat = torch.cat(
                [
                    (
                        g
                        if g is not None
                        else torch.zeros(len(live), *p.shape, dtype=p.dtype, device=p.device)
                    )
                    .reshape(len(live), -1)
                    .to(F64)
                    .cpu()
                    for g, p in zip(grads, self.params, strict=True)
                ],
                dim=1,
            )
        except RuntimeError:  # an op without a batching rule: one backward per pair
            flat = torch.stack([_flat_grad(sub[j], self.params).cpu() for j in range(len(live))])
        rows[idx] = flat
        return rows

    def _greedy(self, root: int) -> int:
        tr = self.tree
        node, prefix = root, list(tr.nodes[root][1])
        k = tr.nodes[root][0]
        while True:
            j = int(torch.argmax(self.pi[node]))
            prefix.append(tr.actions[j])
            nxt = int(tr.child[node, j])
            if nxt < 0:
                return tr.response_index(k, prefix)
            node = nxt

    # ---------------------------------------------------------------- values
    def zra_values(self) -> Tensor:
        """``(n_nodes,)`` MDP values of the ZRA rewards (``RM`` on the last token) with ``gamma``."""
        tr = self.tree
        table = torch.zeros(tr.num_pairs, dtype=F64)
        last = tr.pair.gather(1, (tr.lengths - 1)[:, None]).squeeze(1)
        table[last] = self.rewards
        return _values(table.view(tr.num_nodes, tr.num_actions), self.pi, tr, self.gamma)[0]

    def position_values(self, which: str = "true") -> Tensor:
        """``(N, H)`` ``V(s_t)`` at each position for ``"true"`` or ``"zra"`` token rewards."""
        v = self.V if which == "true" else self.zra_values()
        return v[self.tree.node_of].masked_fill(~self.tree.mask, 0.0)

    # ---------------------------------------------------------------- theory weightings
    def weights(self, name: str, **options: Any) -> Tensor:
        """``(N, H)`` per-token weight of a theory weighting in :data:`THEORY_WEIGHTINGS`."""
        try:
            fn = THEORY_WEIGHTINGS[name]
        except KeyError:
            raise ValueError(
                f"unknown weighting {name!r}; known: {', '.join(THEORY_WEIGHTINGS)}"
            ) from None
        return fn(self, **options).masked_fill(~self.tree.mask, 0.0)

    def moments_of_weights(self, weights: Tensor) -> GradientMoments:
        """Exact moments of the single-response estimator ``sum_t weights_t grad log pi``."""
        tr = self.tree
        w = torch.as_tensor(weights, dtype=F64).masked_fill(~tr.mask, 0.0)
        dense = _scatter_pairs(w, tr.pair, tr.num_pairs)
        return self._exact_moments(dense, self.prob, 1, "exact", None)

    def _exact_moments(
        self, dense: Tensor, prob: Tensor, n_resp: int, method: str, draws: int | None
    ) -> GradientMoments:
        mean = prob @ dense
        second = dense.T @ (dense * prob[:, None])
        return self._finish(mean, second - torch.outer(mean, mean), n_resp, method, draws, None)

    def _finish(
        self,
        pair_mean: Tensor,
        pair_cov: Tensor,
        n_resp: int,
        method: str,
        draws: int | None,
        n_mc: int | None,
    ) -> GradientMoments:
        cov = (pair_cov + pair_cov.T) / 2
        stderr = None
        if n_mc is not None:
            var = torch.einsum("kp,kl,lp->p", self.score, cov, self.score).clamp(min=0.0)
            stderr = (var / n_mc).sqrt()
        return GradientMoments(
            mean=self.score.T @ pair_mean,
            trace_cov=float((self.gram * cov).sum()),
            n_responses=n_resp,
            method=method,
            num_draws=draws,
            stderr=stderr,
            pair_mean=pair_mean,
            pair_cov=cov,
        )

    def compare(self, moments: GradientMoments, target: Tensor | None = None) -> Comparison:
        """:func:`compare` against ``grad J`` (or ``target``)."""
        return compare(moments.mean, self.grad_J if target is None else target, moments.stderr)

    # ---------------------------------------------------------------- registry estimators
    def advantage_inputs(
        self,
        rows: Tensor,
        spec: EstimatorSpec,
        *,
        prefix_values: Tensor | None = None,
        prefix_known: Tensor | None = None,
        next_values: Tensor | None = None,
    ) -> AdvantageInputs:
        """:class:`AdvantageInputs` for responses ``rows`` (``(B,)``, groups contiguous).

        The sampled TRePO inputs (``prefix_values="mc"``) are passed in; everything else
        is filled from the exact tables as ``spec.inputs`` says.
        """
        tr, inp = self.tree, spec.inputs
        mask = tr.mask[rows]
        rewards = self.rewards[rows]
        kw: dict[str, Any] = {}
        prompt = tr.resp_prompt[rows]
        if inp.baseline == "greedy":
            kw["baseline"] = self.greedy_reward[prompt]
        elif inp.baseline == "value":
            kw["baseline"] = self.prompt_value[prompt]
        if inp.token_rewards == "true":
            kw["token_rewards"] = self.token_rewards[rows]
        elif inp.token_rewards == "zra":
            kw["token_rewards"] = est.zra_token_rewards(rewards, mask)
        if inp.values == "exact":
            kw["values"] = self.position_values("true" if inp.token_rewards == "true" else "zra")[
                rows
            ]
        elif inp.values == "zero":
            kw["values"] = torch.zeros(mask.shape, dtype=F64)
        if inp.prefix_values == "exact":
            kw["prefix_values"] = self.prefix_values[rows]
            kw["prefix_known"] = torch.ones(len(rows), tr.horizon + 1, dtype=torch.bool)
        elif inp.prefix_values == "mc":
            if prefix_values is None or prefix_known is None:
                raise ValueError("prefix_values='mc' needs sampled prefix_values and prefix_known")
            kw["prefix_values"], kw["prefix_known"] = prefix_values, prefix_known
            kw["next_values"] = next_values
        return AdvantageInputs(
            rewards=rewards, mask=mask, group_size=spec.group_size, gamma=self.gamma, **kw
        )

    def advantages(self, rows: Tensor, spec: EstimatorSpec, **kw: Any) -> Tensor:
        """``(B, H)`` registry advantages of responses ``rows`` (groups contiguous), 0 on padding.

        ``kw``: sampled TRePO inputs (:meth:`sample_prefix_values`), see :meth:`advantage_inputs`.
        """
        fn = est.get_advantage_estimator(spec.name)
        out = fn(self.advantage_inputs(rows, spec, **kw), **dict(spec.options))
        out = torch.as_tensor(out).to(F64)
        if out.shape != (len(rows), self.tree.horizon):
            raise ValueError(
                f"advantage estimator {spec.name!r} returned shape {tuple(out.shape)}, "
                f"expected {(len(rows), self.tree.horizon)}"
            )
        return out.masked_fill(~self.tree.mask[rows], 0.0)

    def _aggregation_coef(self, lengths: Tensor, mode: str) -> Tensor:
        """``(n, G, H)`` ``d aggregate(x) / d x`` for groups with these ``(n, G)`` lengths.

        Every aggregation mode is linear in the per-token values for a fixed mask, so
        the draw's gradient is ``sum c * A * grad logp``; computed once per distinct
        length pattern.
        """
        h = self.tree.horizon
        base = (h + 1) ** torch.arange(lengths.shape[1])
        codes, inverse = torch.unique((lengths * base).sum(1), return_inverse=True)
        uniq = (codes[:, None] // base[None, :]) % (h + 1)
        coefs = []
        for row in uniq:
            mask = torch.arange(h)[None, :] < row[:, None]
            x = torch.zeros(mask.shape, dtype=F64, requires_grad=True)
            val = est.aggregate(x, mask, mode)
            (g,) = torch.autograd.grad(val, x, allow_unused=True)
            coefs.append(torch.zeros_like(x) if g is None else g)
        return torch.stack(coefs)[inverse]

    def draw_coefficients(self, idx: Tensor, spec: EstimatorSpec, **kw: Any) -> Tensor:
        """``(n, n_pairs)`` coefficient vectors ``a`` of the draws ``idx`` (``(n, G)`` responses).

        The draw's gradient is ``S^T a = grad aggregate(A * logp, mask, spec.aggregation)``.
        """
        n, g = idx.shape
        rows = idx.reshape(-1)
        adv = self.advantages(rows, spec, **kw).view(n, g, -1)
        coef = self._aggregation_coef(self.tree.lengths[idx], spec.aggregation)
        pairs = self.tree.pair[idx].reshape(n, -1)
        return _scatter_pairs((adv * coef).reshape(n, -1), pairs, self.tree.num_pairs)

    def _probe_groups(self, spec: EstimatorSpec) -> tuple[bool, bool]:
        """``(group_local, exchangeable)`` of an estimator, tested on random groups.

        Group-local: a group's advantages do not depend on the other groups of the call.
        Exchangeable: permuting the responses of a group leaves the draw's gradient
        unchanged (true of every built-in); then groups are enumerated as multisets.
        """
        g = spec.group_size
        if g == 1:
            return True, True
        gen = torch.Generator().manual_seed(1234)
        pool = (self.tree.resp_prompt == 0).nonzero().squeeze(1)
        pick = pool[torch.randint(len(pool), (6, g), generator=gen)]
        local = spec.group_local
        if local is None:
            together = self.advantages(pick.reshape(-1), spec).view(6, g, -1)
            local = all(
                torch.allclose(self.advantages(pick[j], spec), together[j], atol=1e-12, rtol=1e-10)
                for j in range(6)
            )
        if not local:
            return False, False
        perm = torch.stack([torch.randperm(g, generator=gen) for _ in range(6)])
        a = self.draw_coefficients(pick, spec)
        b = self.draw_coefficients(pick.gather(1, perm), spec)
        return True, bool(torch.allclose(a, b, atol=1e-12, rtol=1e-10))

    def moments(
        self,
        spec: EstimatorSpec | str,
        *,
        method: str = "auto",
        max_groups: int = 1_000_000,
        mc_samples: int = 20_000,
        seed: int = 0,
    ) -> GradientMoments:
        """Mean and covariance of one draw's gradient for a registered estimator.

        ``method``: ``"exact"`` (every ordered group of ``G``; for ``prefix_values="mc"``
        the rollout noise is handled in closed form, see :meth:`_trepo_exact`),
        ``"mc"`` (``mc_samples`` seeded draws, with standard errors), or ``"auto"``
        (exact when there are at most ``max_groups`` groups per prompt to evaluate and the
        estimator is group-local, else Monte Carlo). An exchangeable estimator (the draw's
        gradient does not depend on the order of the group; checked numerically) is
        enumerated over multisets with multinomial weights, which covers every ordered
        group exactly.
        """
        if isinstance(spec, str):
            spec = EstimatorSpec(spec)
        est.get_advantage_estimator(spec.name)  # clear error for an unknown name
        if method not in ("auto", "exact", "mc"):
            raise ValueError(f"method must be 'auto', 'exact' or 'mc', got {method!r}")
        if spec.inputs.prefix_values == "mc":
            if method != "mc" and spec.group_size == 1:
                return self._trepo_exact(spec)
            if method == "exact":
                raise ValueError("exact moments with Monte Carlo prefix values need group_size=1")
            return self._monte_carlo(spec, mc_samples, seed)
        sizes = [
            int((self.tree.resp_prompt == k).sum()) ** spec.group_size
            for k in range(len(self.tree.prompts))
        ]
        local, exchangeable = self._probe_groups(spec)
        if exchangeable:  # multisets of G responses: about G! times fewer groups
            sizes = [
                math.comb(
                    int((self.tree.resp_prompt == k).sum()) + spec.group_size - 1, spec.group_size
                )
                for k in range(len(self.tree.prompts))
            ]
        if method == "exact" or (method == "auto" and max(sizes) <= max_groups and local):
            if not local:
                raise ValueError(
                    f"{spec.display} is not group-local (it mixes groups, e.g. a batch std); "
                    "use method='mc'"
                )
            return self._enumerate(spec, multisets=exchangeable)
        return self._monte_carlo(spec, mc_samples, seed)

    def _enumerate(
        self, spec: EstimatorSpec, multisets: bool = False, chunk_pairs: int = 4_000_000
    ) -> GradientMoments:
        tr, g = self.tree, spec.group_size
        n_prompts = len(tr.prompts)
        mean = torch.zeros(tr.num_pairs, dtype=F64)
        second = torch.zeros(tr.num_pairs, tr.num_pairs, dtype=F64)
        total = 0
        step = max(1, chunk_pairs // max(1, tr.num_pairs))
        for k in range(n_prompts):
            pool = (tr.resp_prompt == k).nonzero().squeeze(1)
            p_cond = self.prob[pool] * n_prompts
            n_k = len(pool)
            total += n_k**g
            for digits, count in _groups(n_k, g, multisets, step):
                w = count * p_cond[digits].prod(1) / n_prompts
                dense = self.draw_coefficients(pool[digits], spec)
                mean += w @ dense
                second += dense.T @ (dense * w[:, None])
        cov = second - torch.outer(mean, mean)
        return self._finish(mean, cov, g, "enumerated", total, None)

    def sample_groups(self, n: int, group_size: int, generator: torch.Generator) -> Tensor:
        """``(n, G)`` response indices: a uniform prompt per draw, then G i.i.d. responses."""
        tr = self.tree
        n_prompts = len(tr.prompts)
        prompts = torch.randint(n_prompts, (n,), generator=generator)
        cond = torch.zeros(n_prompts, tr.num_responses, dtype=F64)
        for k in range(n_prompts):
            sel = tr.resp_prompt == k
            cond[k, sel] = self.prob[sel] * n_prompts
        return torch.multinomial(cond[prompts], group_size, replacement=True, generator=generator)

    def _anchor_layout(self, rows: Tensor, anchor: Tensor, inputs: InputSpec) -> _Layout:
        """Which value estimates exist for responses ``rows`` with anchor positions ``anchor``.

        ``anchor`` is ``(b, H)`` bool, position ``t`` at column ``t - 1``. Estimate slots:
        ``j < H`` estimates the prefix of column ``j`` (``s_{j+1}``; slot 0 is the root),
        ``H + j`` a fresh second estimate of column ``j`` (``value_estimates="fresh"``).
        """
        tr = self.tree
        b, h = len(rows), tr.horizon
        lengths = tr.lengths[rows]
        inside = torch.arange(h + 1)[None, :] < lengths[:, None]  # non-terminal columns
        before = torch.zeros(b, h + 1, dtype=torch.bool)
        before[:, :h] = anchor
        before[:, 0] = True
        after = torch.zeros(b, h + 1, dtype=torch.bool)
        if inputs.anchor_columns == "pair":
            after[:, 1:] = anchor
        before &= inside
        after &= inside
        known = before | after
        fresh = inputs.value_estimates == "fresh"
        first = (before if fresh else known)[:, :h]
        second = torch.zeros(b, h, dtype=torch.bool)
        if fresh:
            second = after[:, :h]
        nodes = tr.node_of[rows]
        k_root = inputs.root_rollouts or inputs.rollouts
        counts = torch.full((b, h), float(inputs.rollouts), dtype=F64)
        counts[:, 0] = float(k_root)
        var = self.reward_var[nodes] / counts
        active = torch.cat([first, second], dim=1)
        var = torch.where(active, torch.cat([var, var], 1), torch.zeros((), dtype=F64))
        return _Layout(known=known, before=before, after=after, fresh=fresh, active=active, var=var)

    def _place(self, rows: Tensor, slots: Tensor, lay: _Layout) -> dict[str, Tensor | None]:
        """``prefix_values``/``prefix_known``/``next_values`` from slot values ``(b, 2H)``."""
        h = self.tree.horizon
        b = len(rows)
        zero = torch.zeros((), dtype=F64)
        prefix = torch.zeros(b, h + 1, dtype=F64)
        prefix[:, :h] = torch.where(lay.active[:, :h], slots[:, :h], zero)
        out: dict[str, Tensor | None] = {"prefix_values": prefix, "prefix_known": lay.known}
        if lay.fresh:
            after_only = lay.after[:, :h] & ~lay.before[:, :h]
            prefix[:, :h] = torch.where(after_only, slots[:, h:], prefix[:, :h])
            # trepo uses next_values[:, t-1] wherever s_t and s_{t+1} are both known, so
            # every such entry must hold an estimate of V(s_{t+1}): the fresh one at an
            # anchor's s_{t+1}, the shared prefix estimate elsewhere.
            nxt = torch.zeros(b, h, dtype=F64)
            nxt[:, : h - 1] = torch.where(lay.after[:, 1:h], slots[:, h + 1 :], prefix[:, 1:h])
            out["next_values"] = nxt
        return out

    def sample_prefix_values(
        self, rows: Tensor, inputs: InputSpec, generator: torch.Generator
    ) -> dict[str, Tensor | None]:
        """TRePO's Monte Carlo ``prefix_values``, ``prefix_known`` (and ``next_values``).

        Anchors: ``inputs.anchors`` positions uniformly without replacement from ``1..T``;
        each estimate is the mean ``RM`` of fresh completions of its prefix drawn from the
        exact conditional law ``P(W | s)`` (see :class:`InputSpec`).
        """
        tr = self.tree
        b, h = len(rows), tr.horizon
        lengths = tr.lengths[rows]
        pos = torch.arange(h)[None, :]
        if inputs.anchors is None:
            anchor = pos < lengths[:, None]
        else:
            keys = torch.rand(b, h, generator=generator, dtype=F64)
            keys = keys.masked_fill(pos >= lengths[:, None], math.inf)
            anchor = (keys.argsort(1).argsort(1) < inputs.anchors) & (pos < lengths[:, None])
        lay = self._anchor_layout(rows, anchor, inputs)
        nodes = tr.node_of[rows].reshape(-1)
        k_max = max(inputs.rollouts, inputs.root_rollouts or 0)
        draws = torch.multinomial(self.within[nodes], k_max, replacement=True, generator=generator)
        draws2 = torch.multinomial(self.within[nodes], k_max, replacement=True, generator=generator)
        r1, r2 = self.rewards[draws].view(b, h, k_max), self.rewards[draws2].view(b, h, k_max)
        k_root = inputs.root_rollouts or inputs.rollouts
        first = r1[..., : inputs.rollouts].mean(-1)
        first[:, 0] = r1[:, 0, :k_root].mean(-1)
        second = r2[..., : inputs.rollouts].mean(-1)
        return self._place(rows, torch.cat([first, second], 1), lay)

    def _monte_carlo(self, spec: EstimatorSpec, n: int, seed: int) -> GradientMoments:
        gen = torch.Generator().manual_seed(seed)
        idx = self.sample_groups(n, spec.group_size, gen)
        kw: dict[str, Any] = {}
        if spec.inputs.prefix_values == "mc":
            kw = self.sample_prefix_values(idx.reshape(-1), spec.inputs, gen)
        local = self._probe_groups(spec)[0]
        if local:
            dense = self.draw_coefficients(idx, spec, **kw)
        else:  # one registry call per draw (the estimator mixes groups)
            parts = []
            g = spec.group_size
            for j in range(n):
                sub = {key: v[j * g : (j + 1) * g] for key, v in kw.items()}
                parts.append(self.draw_coefficients(idx[j : j + 1], spec, **sub))
            dense = torch.cat(parts)
        mean = dense.mean(0)
        cov = (
            torch.cov(dense.T, correction=1)
            if n > 1
            else torch.zeros(len(mean), len(mean), dtype=F64)
        )
        return self._finish(
            mean, cov.reshape(len(mean), len(mean)), spec.group_size, "monte-carlo", n, n
        )

    def _trepo_exact(self, spec: EstimatorSpec) -> GradientMoments:
        """Exact moments of an estimator of Monte Carlo prefix values (``group_size=1``).

        Every anchor set is enumerated. Given the response and the anchors the estimator
        must be affine in the value estimates (checked numerically; linear or constant
        interpolation and differences are), and distinct estimates are independent means
        of ``K`` completions, with mean ``U(s)`` and variance ``Var(RM | s) / K``. So
        ``E[a | W, anchors] = a(U)`` and ``Cov[a | W, anchors] = sum_j Var_j d_j d_j^T``
        with ``d_j = a(U + e_j) - a(U)``: registry calls only, no sampling.
        """
        tr, inp = self.tree, spec.inputs
        h = tr.horizon
        rows, anchors, weights = [], [], []
        for i in range(tr.num_responses):
            t_len = int(tr.lengths[i])
            m = t_len if inp.anchors is None else min(inp.anchors, t_len)
            subsets = list(itertools.combinations(range(t_len), m))
            for sub in subsets:
                a = torch.zeros(h, dtype=torch.bool)
                a[list(sub)] = True
                rows.append(i)
                anchors.append(a)
                weights.append(float(self.prob[i]) / len(subsets))
        r = torch.tensor(rows)
        w = torch.tensor(weights, dtype=F64)
        nb, n_slots = len(r), 2 * h
        lay = self._anchor_layout(r, torch.stack(anchors), inp)
        u = self.U[tr.node_of[r]]
        base_slots = torch.cat([u, u], dim=1)  # (nb, 2H): every estimate's mean

        def run(slot_values: Tensor, reps: int) -> Tensor:
            rr = r.repeat_interleave(reps)
            lay_r = dataclasses.replace(
                lay,
                known=lay.known.repeat_interleave(reps, 0),
                before=lay.before.repeat_interleave(reps, 0),
                after=lay.after.repeat_interleave(reps, 0),
                active=lay.active.repeat_interleave(reps, 0),
                var=lay.var.repeat_interleave(reps, 0),
            )
            return self.advantages(rr, spec, **self._place(rr, slot_values, lay_r))

        base = run(base_slots, 1)
        eye = torch.eye(n_slots, dtype=F64)
        pert = run((base_slots[:, None, :] + eye[None]).reshape(-1, n_slots), n_slots)
        d = pert.view(nb, n_slots, h) - base[:, None, :]
        gen = torch.Generator().manual_seed(99)
        delta = torch.randn(nb, n_slots, generator=gen, dtype=F64)
        moved = run(base_slots + delta, 1)
        predicted = base + torch.einsum("ns,nst->nt", delta, d)
        if not torch.allclose(moved, predicted, atol=1e-9, rtol=1e-9):
            raise ValueError(
                f"{spec.display} is not affine in its value estimates; use method='mc'"
            )
        pairs = tr.pair[r]
        a_mean = _scatter_pairs(base, pairs, tr.num_pairs)
        d_dense = _scatter_pairs(
            d.reshape(nb * n_slots, h), pairs.repeat_interleave(n_slots, 0), tr.num_pairs
        ).view(nb, n_slots, tr.num_pairs)
        mean = w @ a_mean
        second = a_mean.T @ (a_mean * w[:, None])
        second += torch.einsum("ns,nsk,nsl->kl", w[:, None] * lay.var, d_dense, d_dense)
        return self._finish(mean, second - torch.outer(mean, mean), 1, "exact", nb, None)


# ----------------------------------------------------------------------------- weightings


def _positions(model: ExactModel) -> Tensor:
    return model.discounts[None, :].expand(model.tree.num_responses, -1)


def _lemma1(model: ExactModel) -> Tensor:
    """Lemma 1 (4): ``gamma^(t-1) Q(s_t, w_t)``."""
    tr = model.tree
    return _positions(model) * model.Q.reshape(-1)[tr.pair]


def _lemma2(model: ExactModel, seed: int = 0, scale: float = 1.0) -> Tensor:
    """Lemma 2: ``gamma^(t-1) Q(s_t, w_t) + c(s_t)``, ``c ~ scale * N(0, 1)`` per node (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    c = scale * torch.randn(model.tree.num_nodes, generator=gen, dtype=F64)
    return _lemma1(model) + c[model.tree.node_of]


def _theorem1(model: ExactModel) -> Tensor:
    """Theorem 1 (21): ``E[RM(W^(t+1))] = U(s_{t+1})``, the expected reward of a completion
    sharing ``w_0 .. w_t`` (its single-sample version, ``RM(W)``, is ``reinforce``)."""
    return model.prefix_values[:, 1:]


def _theorem2(model: ExactModel) -> Tensor:
    """Theorem 2 (28): ``U(s_{t+1}) - U(s_t) = gamma^(t-1) (Q - V)``."""
    return model.prefix_values[:, 1:] - model.prefix_values[:, :-1]


def _reinforce(model: ExactModel, baseline: bool = False) -> Tensor:
    """``RM(W)`` on every token, minus ``V(prompt)`` with ``baseline=True``."""
    b = model.prompt_value[model.tree.resp_prompt] if baseline else 0.0
    return (model.rewards - b)[:, None].expand(-1, model.tree.horizon).clone()


def _eq26(model: ExactModel) -> Tensor:
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
