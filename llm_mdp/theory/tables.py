"""Exact tables of a small policy: ``P(W)``, ``RM(W)``, ``J``, ``grad J``, ``V``, ``Q``, scores.

:class:`ExactTables` ties a policy (any :class:`~llm_mdp.policies.Policy`: the tabular one
or a Hugging Face causal LM), a :class:`~llm_mdp.theory.tree.ResponseTree` and token
rewards together and computes, in float64:

* ``P(W)``, ``RM(W) = sum_t gamma^(t-1) r_t``, ``J = E RM(W)`` and ``grad J`` by autograd
  over the enumeration (w.r.t. every trainable parameter of the policy, flattened);
* ``V(s)`` and ``Q(s, w)`` of every node (MDP values of the token rewards with discount
  ``gamma``) and ``U(s) = E[RM(W) | W passes through s]``, the value "in response-level
  units" (``docs/theory.md#theorem-2``):
  ``U(s_t) = sum_{k<t} gamma^(k-1) r_k + gamma^(t-1) V(s_t)``;
* the score matrix ``S``, ``(n_pairs, P)`` rows ``grad log pi(w | s)`` of the (state,
  action) pairs. Every estimator's per-sample gradient ``g = sum_t A_t grad log pi(w_t | s_t)``
  is ``S^T a`` for a per-pair coefficient vector ``a`` of the draw, so mean and covariance
  of ``g`` follow exactly from those of ``a``: ``E g = S^T E a`` and
  ``tr Cov g = <S S^T, Cov a>`` (:meth:`ExactTables.finish_moments`);
* the exact moments of the theory weightings (:data:`~llm_mdp.theory.weightings.THEORY_WEIGHTINGS`).

On a multi-turn tree (chance nodes, ``docs/theory.md#multi-turn``) the rows of the
environment's nodes are its fixed reply law: ``P(W)`` is the product of the policy's and
the environment's probabilities, ``V`` and ``Q`` average over the replies, and the
environment's pairs have score 0, so every estimator's gradient sums over the policy's
tokens only.

The moments of registered estimators are added by :class:`~llm_mdp.theory.moments.ExactModel`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from functools import cached_property
from typing import Any, Self

import torch
from torch import Tensor

from llm_mdp.tasks.turns import ReplyFn

from .specs import F64, Comparison, GradientMoments, ResponseRewardFn, TokenRewardFn, compare
from .tree import ResponseTree, enumerate_tree

__all__ = [
    "ExactTables",
    "as_f64_policy",
    "flat_grad",
    "mdp_values",
    "node_log_probs",
    "scatter_pairs",
]


def as_f64_policy(policy: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``policy`` itself if its parameters already have ``dtype``, else a converted copy."""
    if all(p.dtype == dtype for p in policy.parameters()):
        return policy
    return copy.deepcopy(policy).to(dtype)


def node_log_probs(policy: Any, tree: ResponseTree, device: torch.device) -> Tensor:
    """``(n_nodes, A)`` log pi(w | s) renormalised over ``tree.actions``, differentiable.

    One teacher-forced ``policy.log_probs`` call over every (free node, action) sequence;
    forced nodes (``"force-eos"``) and chance nodes (the environment's reply) get the log
    of their fixed row ``tree.env_prob``: log-prob 0 for a forced EOS, ``-inf`` where the
    row is 0, no gradient.
    """
    a_n = tree.num_actions
    free = (~tree.fixed).nonzero().squeeze(1).tolist()
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
    fixed = tree.fixed.to(device)
    table[fixed] = tree.env_prob.to(device)[fixed].log()
    return table.index_put((torch.tensor(free, dtype=torch.long, device=device),), lp)


def flat_grad(out: Tensor, params: Sequence[Tensor], retain: bool = True) -> Tensor:
    grads = torch.autograd.grad(out, list(params), retain_graph=retain, allow_unused=True)
    return torch.cat(
        [
            (g if g is not None else torch.zeros_like(p)).reshape(-1).to(F64).cpu()
            for g, p in zip(grads, params, strict=True)
        ]
    )


def mdp_values(r: Tensor, probs: Tensor, tree: ResponseTree, gamma: float) -> tuple[Tensor, Tensor]:
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


def scatter_pairs(coef: Tensor, pairs: Tensor, n_pairs: int) -> Tensor:
    """``(n, n_pairs)`` dense coefficients from ``(n, L)`` weights at ``(n, L)`` pair indices."""
    out = torch.zeros(coef.shape[0], n_pairs, dtype=F64)
    return out.scatter_add_(1, pairs, coef.to(F64))


class ExactTables:
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
        tokenizer: optional; names tokens in messages (:meth:`token_name`).

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
        greedy_reward: ``(n_prompts,)`` ``RM`` of the greedy response of each prompt; on a
            multi-turn tree the greedy policy's expected ``RM`` over the environment's
            replies (ReMax's baseline is then the mean of its greedy rollout's reward:
            the mean gradient is exact, the variance is that of this mean baseline).
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
        tokenizer: Any = None,
    ) -> None:
        if not 0.0 < gamma <= 1.0:
            raise ValueError(f"gamma must be in (0, 1], got {gamma}")
        if tree.multi_turn and gamma != 1.0:
            raise ValueError(
                f"gamma={gamma} on a multi-turn tree: the agents count time in the policy's "
                "tokens, the tables in every token; the exact toolkit needs gamma = 1 there "
                "(docs/theory.md#multi-turn)"
            )
        self.tree = tree
        self.gamma = float(gamma)
        self.tokenizer = tokenizer
        self.policy = as_f64_policy(policy, F64)
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
        r_table = r_table.masked_fill(tr.fixed[:, None] & (tr.env_prob == 0), 0.0)
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
        self._log_pi_graph = node_log_probs(self.policy, tr, self.device).cpu()
        self.log_pi = self._log_pi_graph.detach()
        self.pi = self.log_pi.exp()
        n_prompts = len(tr.prompts)
        flat = self._log_pi_graph.reshape(-1)
        resp_logp = flat[tr.pair].masked_fill(~tr.mask, 0.0).sum(1)
        self._prob_graph = resp_logp.exp() / n_prompts
        self.prob = self._prob_graph.detach()
        self.J_tensor = (self._prob_graph * self.rewards).sum()
        self.J = float(self.J_tensor.detach())
        self.grad_J = flat_grad(self.J_tensor, self.params)
        self.score = self._score_matrix(flat)
        self.gram = self.score @ self.score.T
        # ---- values
        self.V, self.Q = mdp_values(r_table, self.pi, tr, gamma)
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
        if tr.multi_turn:  # the greedy policy's expected RM: the replies stay random
            self.greedy_reward = self._greedy_value(n_prompts)
        else:
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
        tokenizer: Any = None,
        reply_fn: ReplyFn | None = None,
        max_turns: int | None = None,
    ) -> Self:
        """Build from plain Python reward functions over token ids.

        ``token_reward(prompt, prefix, token)`` gives true token rewards (any ``gamma``);
        ``reward(prompt, response)`` a response-level ``RM`` (ZRA, ``gamma = 1``). Give one
        (or both, to have them checked against each other). ``tokenizer`` (optional)
        names the tokens in messages and is handed to ``reply_fn``. ``reply_fn`` and
        ``max_turns`` make the tree multi-turn (:func:`~llm_mdp.theory.tree.enumerate_tree`);
        ``token_reward`` is then also asked about the environment's tokens.
        """
        tree = enumerate_tree(
            prompts,
            actions,
            eos_token_id,
            horizon,
            length_cap,
            reply_fn=reply_fn,
            max_turns=max_turns,
            tokenizer=tokenizer,
        )
        r_table = None
        if token_reward is not None:
            r_table = torch.zeros(tree.num_nodes, tree.num_actions, dtype=F64)
            for i, (k, prefix) in enumerate(tree.nodes):
                for j, a in enumerate(tree.actions):
                    if tree.fixed[i] and tree.env_prob[i, j] == 0:
                        continue
                    r_table[i, j] = float(token_reward(tree.prompts[k], prefix, a))
        rm = None
        if reward is not None:
            rm = torch.tensor(
                [float(reward(tree.prompts[k], toks)) for k, toks in tree.responses], dtype=F64
            )
        return cls(
            policy, tree, token_rewards=r_table, rewards=rm, gamma=gamma, tokenizer=tokenizer
        )

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
    ) -> Self:
        """Build from a :class:`~llm_mdp.tasks.Task` (its prompts, tokenizer and rewards).

        ``actions`` default: the task's legal actions (``task.action_mask``); ``horizon`` default:
        ``task.max_response_tokens``; ``gamma`` default: ``task.gamma``. Token rewards come
        from ``task.token_reward_fn`` when the task has one (checked to be a function of
        (prefix, token) and to sum to ``RM``), else ZRA from ``task.reward_fn``. A
        multi-turn task (``task.reply_fn``, ``task.max_turns``) gives a tree with chance
        nodes; its reward functions see the environment's tokens as the env shows them
        (``ResponseBatch.policy_mask``).
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
        tree = enumerate_tree(
            prompt_ids,
            acts,
            eos,
            h,
            length_cap,
            reply_fn=task.reply_fn,
            max_turns=task.max_turns,
            tokenizer=tok,
            prompt_indices=range(len(prompt_ids)) if prompts is None else [-1] * len(prompt_ids),
        )
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
            policy_mask=tree.policy_mask.long() if tree.multi_turn else None,
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
        return cls(policy, tree, token_rewards=r_table, rewards=rm, gamma=g, tokenizer=tok)

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
            flat = torch.stack([flat_grad(sub[j], self.params).cpu() for j in range(len(live))])
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

    def _greedy_value(self, n_prompts: int) -> Tensor:
        """``(n_prompts,)`` expected ``RM`` of the greedy policy (argmax at decision nodes,
        the environment's law at chance nodes)."""
        tr = self.tree
        first = torch.argmax(self.pi, dim=1)
        greedy = torch.zeros_like(self.pi).scatter_(1, first[:, None], 1.0)
        rows = torch.where(tr.fixed[:, None], tr.env_prob, greedy).reshape(-1)
        p = rows[tr.pair].masked_fill(~tr.mask, 1.0).prod(1)
        out = torch.zeros(n_prompts, dtype=F64)
        return out.index_add_(0, tr.resp_prompt, p * self.rewards)

    # ---------------------------------------------------------------- names
    def token_name(self, token: int) -> str:
        """The tokenizer's name of ``token`` (``"<eos>"`` for EOS); without one, its id
        (``"EOS"`` for the tree's EOS)."""
        if self.tokenizer is None:
            return "EOS" if token == self.tree.eos_token_id else str(token)
        name = self.tokenizer.convert_ids_to_tokens(int(token))
        return str(name) if name is not None else str(token)

    def text(self, ids: Sequence[int]) -> str:
        """Tokens ``ids`` as the tokenizer names them, joined (space-separated ids without one)."""
        if self.tokenizer is None:
            return " ".join(self.token_name(i) for i in ids)
        return "".join(self.token_name(i) for i in ids)

    # ---------------------------------------------------------------- values
    def zra_values(self) -> Tensor:
        """``(n_nodes,)`` MDP values of the ZRA rewards (``RM`` on the last token) with ``gamma``."""
        return self._zra_values.clone()

    @cached_property
    def _zra_values(self) -> Tensor:
        tr = self.tree
        table = torch.zeros(tr.num_pairs, dtype=F64)
        last = tr.pair.gather(1, (tr.lengths - 1)[:, None]).squeeze(1)
        table[last] = self.rewards
        return mdp_values(table.view(tr.num_nodes, tr.num_actions), self.pi, tr, self.gamma)[0]

    @cached_property
    def _position_values(self) -> dict[str, Tensor]:
        tr = self.tree
        return {
            which: v[tr.node_of].masked_fill(~tr.mask, 0.0)
            for which, v in (("true", self.V), ("zra", self._zra_values))
        }

    def position_values(self, which: str = "true") -> Tensor:
        """``(N, H)`` ``V(s_t)`` at each position for ``"true"`` or ``"zra"`` token rewards
        (computed once: the estimators read them on every draw)."""
        return self._position_values["true" if which == "true" else "zra"]

    # ---------------------------------------------------------------- theory weightings
    def weights(self, name: str, **options: Any) -> Tensor:
        """``(N, H)`` per-token weight of a theory weighting in :data:`THEORY_WEIGHTINGS`."""
        from .weightings import THEORY_WEIGHTINGS  # the weightings read these tables

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
        dense = scatter_pairs(w, tr.pair, tr.num_pairs)
        return self.exact_moments(dense, self.prob, 1, "exact", None)

    def exact_moments(
        self, dense: Tensor, prob: Tensor, n_resp: int, method: str, draws: int | None
    ) -> GradientMoments:
        """Exact moments of draws with coefficient rows ``dense`` ``(n, n_pairs)``, law ``prob``."""
        mean = prob @ dense
        second = dense.T @ (dense * prob[:, None])
        return self.finish_moments(
            mean, second - torch.outer(mean, mean), n_resp, method, draws, None
        )

    def finish_moments(
        self,
        pair_mean: Tensor,
        pair_cov: Tensor,
        n_resp: int,
        method: str,
        draws: int | None,
        n_mc: int | None,
    ) -> GradientMoments:
        """:class:`GradientMoments` from the moments of ``a`` (``n_mc``: Monte Carlo draws)."""
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
