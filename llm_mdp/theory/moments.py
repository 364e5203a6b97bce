"""Exact and Monte Carlo moments of registered estimators' gradients: :class:`ExactModel`.

:class:`ExactModel` adds to the tables of :class:`~llm_mdp.theory.tables.ExactTables` the
law of one draw's gradient for any estimator of the registry (:mod:`llm_mdp.estimators`),
described by an :class:`~llm_mdp.theory.specs.EstimatorSpec`:

* **enumeration**: every ordered group of ``G`` responses to a prompt (as multisets with
  multinomial weights when the estimator is exchangeable), weighted by its probability;
* **Monte Carlo**: seeded draws with standard errors, when groups are too many or the
  estimator mixes groups (GRPO with a batch std);
* **TRePO closed forms**: every anchor set enumerated, the estimates placed by the agent's
  own plan (:func:`~llm_mdp.anchors.anchor_plan`) and the rollout noise carried through
  its exact variance ``Var(RM | s) / K``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from llm_mdp import estimators as est
from llm_mdp.anchors import AnchorPlan, anchor_plan, place_estimates
from llm_mdp.estimators import AdvantageInputs

from .specs import F64, EstimatorSpec, GradientMoments, InputSpec
from .tables import ExactTables, scatter_pairs

__all__ = ["STATE_ESTIMATORS", "ExactModel", "ordered_groups"]

STATE_ESTIMATORS = ("trepo",)
"""Estimators the agents run over decision states on a multi-turn task (columns = the
policy's tokens, right-padded; ``ExactModel.state_view``), as the TRePO agent does; every
other estimator sees the response columns with the policy's tokens as its mask."""


def ordered_groups(n: int, g: int, multisets: bool, step: int) -> Iterator[tuple[Tensor, Tensor]]:
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


class ExactModel(ExactTables):
    """:class:`~llm_mdp.theory.tables.ExactTables` plus the moments of registered estimators.

    Build it as the tables (``ExactModel(policy, tree, token_rewards=..., rewards=...)``,
    :meth:`~ExactTables.from_functions`, :meth:`~ExactTables.from_task`); then
    :meth:`moments` gives one draw's ``E g`` and ``tr Cov g`` for an estimator.
    """

    def state_view(self, rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The decision states of responses ``rows``, as the agents index them.

        Returns ``(nodes (b, H), lengths (b,), columns (b, H))``: ``nodes[i, k]`` is the
        state of the policy's ``k``-th token (0 past ``lengths[i]``, the number of the
        policy's tokens) and ``columns[i, k]`` its response column (``H`` past the end).
        Single-turn: the response positions themselves. Multi-turn: the environment's
        tokens are skipped, so the state after a turn's EOS is the one after the reply
        (``llm_mdp.agents.rollout.Rollout.decision_columns``): TRePO's prefix values,
        anchors and value rollouts live on these states.
        """
        tr, h = self.tree, self.tree.horizon
        cols = torch.arange(h).expand(len(rows), h)
        if not tr.multi_turn:
            return tr.node_of[rows], tr.lengths[rows], cols
        pm = tr.policy_mask[rows]
        n = pm.sum(1)
        order = torch.sort((~pm).to(torch.int8), dim=1, stable=True).indices  # policy first
        valid = cols < n[:, None]
        nodes = torch.where(valid, tr.node_of[rows].gather(1, order), 0)
        return nodes, n, torch.where(valid, order, h)

    def state_prefix_values(self, rows: Tensor) -> Tensor:
        """``(b, H + 1)`` exact ``U`` at the decision states of :meth:`state_view`, ``RM(W)``
        from the terminal state on (:attr:`prefix_values` for a single-turn tree)."""
        if not self.tree.multi_turn:
            return self.prefix_values[rows]
        nodes, n, _ = self.state_view(rows)
        rm = self.rewards[rows][:, None]
        u = torch.cat([self.U[nodes], rm], dim=1)
        pos = torch.arange(self.tree.horizon + 1)[None, :]
        return torch.where(pos < n[:, None], u, rm)

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
        is filled from the exact tables as ``spec.inputs`` says. On a multi-turn tree the
        mask is the policy's tokens (as the agents' ``Rollout.response_mask``), a true
        token reward of an environment token is added to the policy token before it
        (``gamma = 1``), and prefix values are indexed by decision state
        (:meth:`state_view`; a :data:`STATE_ESTIMATORS` estimator then runs on those
        states, :meth:`advantages`).
        """
        tr, inp = self.tree, spec.inputs
        mask = tr.policy_mask[rows]
        rewards = self.rewards[rows]
        kw: dict[str, Any] = {}
        prompt = tr.resp_prompt[rows]
        if inp.baseline == "greedy":
            kw["baseline"] = self.greedy_reward[prompt]
        elif inp.baseline == "value":
            kw["baseline"] = self.prompt_value[prompt]
        if inp.token_rewards == "true":
            kw["token_rewards"] = self._policy_token_rewards(rows)
        elif inp.token_rewards == "zra":
            kw["token_rewards"] = est.zra_token_rewards(rewards, mask)
        if inp.values == "exact":
            kw["values"] = self.position_values("true" if inp.token_rewards == "true" else "zra")[
                rows
            ]
        elif inp.values == "zero":
            kw["values"] = torch.zeros(mask.shape, dtype=F64)
        if inp.prefix_values == "exact":
            kw["prefix_values"] = self.state_prefix_values(rows)
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
        tr, h = self.tree, self.tree.horizon
        inputs = self.advantage_inputs(rows, spec, **kw)
        on_states = tr.multi_turn and spec.name in STATE_ESTIMATORS
        if on_states:  # over decision states, right-padded, as the TRePO agent runs it
            _, n, columns = self.state_view(rows)
            inputs = replace(inputs, mask=torch.arange(h)[None, :] < n[:, None])
        out = fn(inputs, **dict(spec.options))
        out = torch.as_tensor(out).to(F64)
        if out.shape != (len(rows), h):
            raise ValueError(
                f"advantage estimator {spec.name!r} returned shape {tuple(out.shape)}, "
                f"expected {(len(rows), h)}"
            )
        if on_states:  # back to the response columns of the policy's tokens
            full = torch.zeros(len(rows), h + 1, dtype=F64)
            out = full.scatter_(1, columns, out.masked_fill(~inputs.mask, 0.0))[:, :h]
        return out.masked_fill(~tr.policy_mask[rows], 0.0)

    def _policy_token_rewards(self, rows: Tensor) -> Tensor:
        """``(b, H)`` true token rewards with each environment token's added to the policy
        token before it (the reply is part of that token's transition; ``gamma = 1``)."""
        tr = self.tree
        tok = self.token_rewards[rows]
        if not tr.multi_turn:
            return tok
        pm = tr.policy_mask[rows]
        cols = torch.arange(tr.horizon).expand_as(pm)
        owner = torch.where(pm, cols, -1).cummax(dim=1).values.clamp(min=0)
        return torch.zeros_like(tok).scatter_add_(1, owner, tok.masked_fill(~tr.mask[rows], 0.0))

    def _aggregation_coef(self, masks: Tensor, mode: str) -> Tensor:
        """``(n, G, H)`` ``d aggregate(x) / d x`` for groups with these ``(n, G, H)`` loss masks.

        The loss mask is the policy's tokens (``tree.policy_mask``: the environment's
        replies are not counted, as in the agents' losses). Every aggregation mode is
        linear in the per-token values for a fixed mask, so the draw's gradient is
        ``sum c * A * grad logp``; computed once per distinct mask pattern of a group.
        """
        n, g, h = masks.shape
        uniq, inverse = torch.unique(masks.reshape(n, g * h), dim=0, return_inverse=True)
        coefs = []
        for row in uniq:
            mask = row.view(g, h)
            x = torch.zeros(mask.shape, dtype=F64, requires_grad=True)
            val = est.aggregate(x, mask, mode)
            (grad,) = torch.autograd.grad(val, x, allow_unused=True)
            coefs.append(torch.zeros_like(x) if grad is None else grad)
        return torch.stack(coefs)[inverse]

    def draw_coefficients(self, idx: Tensor, spec: EstimatorSpec, **kw: Any) -> Tensor:
        """``(n, n_pairs)`` coefficient vectors ``a`` of the draws ``idx`` (``(n, G)`` responses).

        The draw's gradient is ``S^T a = grad aggregate(A * logp, mask, spec.aggregation)``.
        """
        n, g = idx.shape
        rows = idx.reshape(-1)
        adv = self.advantages(rows, spec, **kw).view(n, g, -1)
        coef = self._aggregation_coef(self.tree.policy_mask[idx], spec.aggregation)
        pairs = self.tree.pair[idx].reshape(n, -1)
        return scatter_pairs((adv * coef).reshape(n, -1), pairs, self.tree.num_pairs)

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
            for digits, count in ordered_groups(n_k, g, multisets, step):
                w = count * p_cond[digits].prod(1) / n_prompts
                dense = self.draw_coefficients(pool[digits], spec)
                mean += w @ dense
                second += dense.T @ (dense * w[:, None])
        cov = second - torch.outer(mean, mean)
        return self.finish_moments(mean, cov, g, "enumerated", total, None)

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

    def anchor_plan(self, rows: Tensor, anchor: Tensor, inputs: InputSpec) -> AnchorPlan:
        """The agent's :func:`~llm_mdp.anchors.anchor_plan` for responses ``rows``.

        ``anchor`` is ``(b, H)`` bool, position ``t`` at column ``t - 1``.
        """
        return anchor_plan(
            self.state_view(rows)[1],
            anchor,
            columns=inputs.anchor_columns,
            value_estimates=inputs.value_estimates,
        )

    def slot_variance(self, rows: Tensor, plan: AnchorPlan, inputs: InputSpec) -> Tensor:
        """``(b, 2H)`` variance of each estimate slot (first ``H``, then second; 0 if absent).

        An estimate of column ``c`` is the mean ``RM`` of ``K`` completions of ``s_{c+1}``:
        variance ``Var(RM | s_{c+1}) / K`` (``K = root_rollouts`` for column 0).
        """
        b, h = len(rows), self.tree.horizon
        counts = torch.full((b, h), float(inputs.rollouts), dtype=F64)
        counts[:, 0] = float(inputs.root_rollouts or inputs.rollouts)
        var = self.reward_var[self.state_view(rows)[0]] / counts
        active = torch.cat([plan.first[:, :h], plan.second[:, :h]], dim=1)
        return torch.where(active, torch.cat([var, var], 1), torch.zeros((), dtype=F64))

    def place_slots(self, plan: AnchorPlan, slots: Tensor) -> dict[str, Tensor | None]:
        """The trepo inputs from ``(b, 2H)`` slot estimates.

        By :func:`~llm_mdp.anchors.place_estimates`, as the agent places its own.
        """
        h = self.tree.horizon
        pad = torch.zeros(len(slots), 1, dtype=F64)
        first = torch.cat([slots[:, :h], pad], dim=1)
        second = torch.cat([slots[:, h:], pad], dim=1)
        prefix, nxt = place_estimates(plan, first, second)
        out: dict[str, Tensor | None] = {"prefix_values": prefix, "prefix_known": plan.known}
        if nxt is not None:
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
        state_nodes, lengths, _ = self.state_view(rows)
        pos = torch.arange(h)[None, :]
        if inputs.anchors is None:
            anchor = pos < lengths[:, None]
        else:
            keys = torch.rand(b, h, generator=generator, dtype=F64)
            keys = keys.masked_fill(pos >= lengths[:, None], math.inf)
            anchor = (keys.argsort(1).argsort(1) < inputs.anchors) & (pos < lengths[:, None])
        plan = self.anchor_plan(rows, anchor, inputs)
        nodes = state_nodes.reshape(-1)
        k_max = max(inputs.rollouts, inputs.root_rollouts or 0)
        draws = torch.multinomial(self.within[nodes], k_max, replacement=True, generator=generator)
        draws2 = torch.multinomial(self.within[nodes], k_max, replacement=True, generator=generator)
        r1, r2 = self.rewards[draws].view(b, h, k_max), self.rewards[draws2].view(b, h, k_max)
        k_root = inputs.root_rollouts or inputs.rollouts
        first = r1[..., : inputs.rollouts].mean(-1)
        first[:, 0] = r1[:, 0, :k_root].mean(-1)
        second = r2[..., : inputs.rollouts].mean(-1)
        return self.place_slots(plan, torch.cat([first, second], 1))

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
        return self.finish_moments(
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
        state_nodes, state_lengths, _ = self.state_view(torch.arange(tr.num_responses))
        for i in range(tr.num_responses):
            t_len = int(state_lengths[i])
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
        anchors_t = torch.stack(anchors)
        nb, n_slots = len(r), 2 * h
        plan = self.anchor_plan(r, anchors_t, inp)
        var = self.slot_variance(r, plan, inp)
        u = self.U[state_nodes[r]]
        base_slots = torch.cat([u, u], dim=1)  # (nb, 2H): every estimate's mean

        def run(slot_values: Tensor, reps: int) -> Tensor:
            rr = r.repeat_interleave(reps)
            plan_r = self.anchor_plan(rr, anchors_t.repeat_interleave(reps, 0), inp)
            return self.advantages(rr, spec, **self.place_slots(plan_r, slot_values))

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
        a_mean = scatter_pairs(base, pairs, tr.num_pairs)
        d_dense = scatter_pairs(
            d.reshape(nb * n_slots, h), pairs.repeat_interleave(n_slots, 0), tr.num_pairs
        ).view(nb, n_slots, tr.num_pairs)
        mean = w @ a_mean
        second = a_mean.T @ (a_mean * w[:, None])
        second += torch.einsum("ns,nsk,nsl->kl", w[:, None] * var, d_dense, d_dense)
        return self.finish_moments(mean, second - torch.outer(mean, mean), 1, "exact", nb, None)
