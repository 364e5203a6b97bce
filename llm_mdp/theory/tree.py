"""Exhaustive enumeration of the response tree of a small token MDP.

A *node* is a state ``s_t`` that has not ended: a prompt plus a response prefix. A
*response* is a leaf: a prefix that ended, at EOS or at the length cap. Two length-cap
conventions are supported (``length_cap``):

``"env"`` (the env's rule, :class:`~llm_mdp.envs.LLMTokenEnv`)
    EOS counts as a token; a response that reaches ``horizon`` tokens ends there without
    EOS. Every node (prefix length ``0 .. H-1``) chooses freely among ``actions``. With
    ``actions = {a, b, EOS}`` and ``H = 4``: ``1+2+4+8 = 15`` responses ending in EOS plus
    ``16`` capped ones, 31 in all.

``"force-eos"`` (the small set-up of ``docs/theory.md#the-token-mdp``: "up to 4 tokens,
15 responses")
    Every response ends with EOS and has at most ``horizon`` tokens, EOS included: at
    prefix length ``H - 1`` the only action is EOS (the node is *forced*, probability 1,
    no gradient). With ``{a, b, EOS}`` and ``H = 4`` the responses are ``{a,b}^k EOS`` for
    ``k = 0..3``: 15. The decision tree is the same as ``"env"`` with ``H = 3`` (7 decision
    nodes, 15 leaves); only the extra (forced) EOS token and its reward differ.

Multi-turn trees (``docs/theory.md#multi-turn``): with a ``reply_fn``
(:mod:`llm_mdp.tasks.turns`) a policy EOS ends a *turn*, not the response; the
environment then appends its reply, one of its outcomes with its probability. Every
prefix inside or at the start of a reply is a *chance node*: its row of next-token
probabilities is the environment's (``env_prob``), constant in the policy's parameters,
so its tokens carry no gradient (``policy_mask`` is False on them). The probability of a
response is the product of the policy's and the environment's probabilities along it.
The length cap counts every token, replies included: a reply that runs into the cap is
cut there (the env's truncation). A forced EOS (``"force-eos"``) is still the policy's
token. Single-turn trees are unchanged (no chance node, ``policy_mask == mask``).

Tensors use the conventions of :mod:`llm_mdp.estimators`: responses are rows, position
``t`` (1-based) is column ``t - 1``, padded to width ``H`` with a right-padded mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from llm_mdp.tasks.turns import ReplyFn, ReplyOutcomes, reply_after

__all__ = ["LENGTH_CAPS", "LengthCap", "ResponseTree", "enumerate_tree"]

LengthCap = Literal["env", "force-eos"]
LENGTH_CAPS: tuple[str, ...] = ("env", "force-eos")

MAX_RESPONSES = 200_000


@dataclass(frozen=True, eq=False)
class ResponseTree:
    """Every node and every response of the token MDP for some prompts (policy-free).

    Attributes:
        prompts: prompt token ids, one tuple per prompt (prompt ``k`` has index ``k``).
        actions: token ids the policy may emit, EOS among them (``A = len(actions)``);
            also the columns of every node's row (environment replies use them too).
        eos_token_id: the token that ends a response (or, multi-turn, a turn).
        horizon: ``H``, the most tokens a response can have (replies included).
        length_cap: ``"env"`` or ``"force-eos"`` (module docstring).
        nodes: ``(prompt_index, prefix)`` per node, by prompt, then depth, then in the
            order of ``actions``.
        responses: ``(prompt_index, tokens)`` per response.
        node_prompt, node_depth: ``(n_nodes,)`` long.
        forced: ``(n_nodes,)`` bool, decision nodes whose only action is EOS (``"force-eos"``).
        chance: ``(n_nodes,)`` bool, nodes where the environment emits the next token
            (multi-turn; all False for a single-turn tree).
        env_prob: ``(n_nodes, A)`` float64, the fixed next-token law of forced and chance
            nodes (0 on the rows of free decision nodes).
        child: ``(n_nodes, A)`` long, the node reached by each token, ``-1`` if it ends.
        resp_prompt, lengths: ``(N,)`` long.
        tokens: ``(N, H)`` long token ids (``eos_token_id`` on padding).
        mask: ``(N, H)`` bool, right-padded: every real token, the environment's included.
        policy_mask: ``(N, H)`` bool, the tokens the policy chose (``mask`` without the
            environment's replies): the loss mask.
        node_of: ``(N, H)`` long, the node ``s_t`` at each position (0 on padding).
        action_of: ``(N, H)`` long, the index into ``actions`` of ``w_t`` (0 on padding).
        pair: ``(N, H)`` long, ``node_of * A + action_of`` (index of the pair ``(s_t, w_t)``).
        passes: ``(n_nodes, N)`` bool, response ``i`` passes through node ``n``.
    """

    prompts: tuple[tuple[int, ...], ...]
    actions: tuple[int, ...]
    eos_token_id: int
    horizon: int
    length_cap: str
    nodes: tuple[tuple[int, tuple[int, ...]], ...]
    responses: tuple[tuple[int, tuple[int, ...]], ...]
    node_prompt: torch.Tensor = field(repr=False)
    node_depth: torch.Tensor = field(repr=False)
    forced: torch.Tensor = field(repr=False)
    chance: torch.Tensor = field(repr=False)
    env_prob: torch.Tensor = field(repr=False)
    child: torch.Tensor = field(repr=False)
    resp_prompt: torch.Tensor = field(repr=False)
    lengths: torch.Tensor = field(repr=False)
    tokens: torch.Tensor = field(repr=False)
    mask: torch.Tensor = field(repr=False)
    policy_mask: torch.Tensor = field(repr=False)
    node_of: torch.Tensor = field(repr=False)
    action_of: torch.Tensor = field(repr=False)
    pair: torch.Tensor = field(repr=False)
    passes: torch.Tensor = field(repr=False)

    @property
    def num_nodes(self) -> int:
        return len(self.nodes)

    @property
    def num_responses(self) -> int:
        return len(self.responses)

    @property
    def num_actions(self) -> int:
        return len(self.actions)

    @property
    def num_pairs(self) -> int:
        """``n_nodes * A``: the (state, action) pairs, the space per-sample gradients live in."""
        return self.num_nodes * self.num_actions

    @property
    def eos_index(self) -> int:
        return self.actions.index(self.eos_token_id)

    @property
    def multi_turn(self) -> bool:
        """True when the tree has chance nodes (the environment injects tokens)."""
        return bool(self.chance.any())

    @property
    def fixed(self) -> torch.Tensor:
        """``(n_nodes,)`` bool: nodes whose row is ``env_prob``, not the policy's (forced or
        chance); their pairs carry no gradient."""
        return self.forced | self.chance

    def response_index(self, prompt_index: int, tokens: Sequence[int]) -> int:
        """Row of a response; ``KeyError`` if it is not a leaf of this tree."""
        key = (int(prompt_index), tuple(int(t) for t in tokens))
        try:
            return self.responses.index(key)
        except ValueError:
            raise KeyError(f"response {key[1]} of prompt {key[0]} is not in the tree") from None

    def node_index(self, prompt_index: int, prefix: Sequence[int]) -> int:
        key = (int(prompt_index), tuple(int(t) for t in prefix))
        try:
            return self.nodes.index(key)
        except ValueError:
            raise KeyError(f"prefix {key[1]} of prompt {key[0]} is not a node") from None

    def describe(self) -> str:
        chance = f", {int(self.chance.sum())} chance" if self.multi_turn else ""
        return (
            f"{self.num_responses} responses, {self.num_nodes} nodes "
            f"({int(self.forced.sum())} forced{chance}), {len(self.prompts)} prompt(s), "
            f"{self.num_actions} actions, horizon {self.horizon}, length_cap={self.length_cap!r}"
        )


@dataclass(frozen=True)
class _State:
    """A node while enumerating: its prefix, which tokens are the policy's, the turns
    finished, and at a chance node the outcomes still possible (``(p, rest)``)."""

    prefix: tuple[int, ...]
    policy: tuple[bool, ...]
    turns: int
    outcomes: ReplyOutcomes | None = None


def enumerate_tree(
    prompts: Sequence[Sequence[int]],
    actions: Sequence[int],
    eos_token_id: int,
    horizon: int,
    length_cap: str = "env",
    *,
    reply_fn: ReplyFn | None = None,
    max_turns: int | None = None,
    tokenizer: Any = None,
    prompt_indices: Sequence[int] | None = None,
) -> ResponseTree:
    """Enumerate every node and response (see the module docstring for ``length_cap``).

    Args:
        prompts: prompt token-id sequences (distinct, non-empty).
        actions: the tokens the policy may emit (EOS must be one of them); the policy is
            renormalised over them (e.g. a subset of a larger vocabulary).
        eos_token_id: the EOS id.
        horizon: ``H >= 1`` (``>= 2`` for ``"force-eos"`` to leave a choice).
        length_cap: ``"env"`` or ``"force-eos"``.
        reply_fn: makes the tree multi-turn: the environment's reply to each finished
            turn (:func:`~llm_mdp.tasks.turns.reply_after`, the protocol the env follows).
            Its tokens must be among ``actions``.
        max_turns: the turn cap (``Task.max_turns``).
        tokenizer: handed to ``reply_fn`` in its :class:`~llm_mdp.tasks.turns.Turn`.
        prompt_indices: the ``Turn.prompt_index`` of each prompt (default ``0, 1, ...``).
    """
    if length_cap not in LENGTH_CAPS:
        raise ValueError(f"length_cap must be one of {LENGTH_CAPS}, got {length_cap!r}")
    acts = tuple(int(a) for a in actions)
    if len(set(acts)) != len(acts) or int(eos_token_id) not in acts:
        raise ValueError(
            f"actions must be distinct token ids including eos_token_id={eos_token_id}, got {acts}"
        )
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}")
    if length_cap == "force-eos" and horizon < 2:
        raise ValueError(
            "length_cap='force-eos' needs horizon >= 2 (with 1 the only response is EOS)"
        )
    keys = tuple(tuple(int(t) for t in p) for p in prompts)
    if not keys or len(set(keys)) != len(keys) or any(not p for p in keys):
        raise ValueError("prompts must be distinct, non-empty token-id sequences (at least one)")
    indices = list(range(len(keys))) if prompt_indices is None else [int(i) for i in prompt_indices]
    if len(indices) != len(keys):
        raise ValueError(f"{len(indices)} prompt_indices for {len(keys)} prompts")
    eos = int(eos_token_id)
    others = [a for a in acts if a != eos]
    n_est = len(keys) * sum(len(others) ** k for k in range(horizon + 1)) * len(acts)
    if reply_fn is None and n_est > MAX_RESPONSES:
        raise ValueError(
            f"about {n_est} responses for {len(acts)} actions and horizon {horizon}: the exact "
            f"toolkit is for tiny trees (at most {MAX_RESPONSES})"
        )
    a_index = {a: j for j, a in enumerate(acts)}

    def reply(k: int, state: _State) -> ReplyOutcomes | None:
        if reply_fn is None:
            return None
        out = reply_after(
            reply_fn,
            prompt_index=indices[k],
            prompt_ids=keys[k],
            response_ids=state.prefix,
            policy_mask=state.policy,
            turns=state.turns,
            tokenizer=tokenizer,
            max_turns=max_turns,
        )
        for _, ids in out or ():
            bad = [t for t in ids if t not in a_index]
            if bad:
                raise ValueError(
                    f"reply_fn replied {list(ids)} after {list(state.prefix)} (prompt {k}): "
                    f"tokens {bad} are not among the tree's actions {list(acts)}"
                )
        return out

    def successors(k: int, state: _State) -> list[tuple[int, float, _State | None]]:
        """``(column, env probability, next state or None for a leaf)`` per token."""
        depth = len(state.prefix)
        out: list[tuple[int, float, _State | None]] = []
        if state.outcomes is not None:  # chance node: the environment's next token
            total = sum(p for p, _ in state.outcomes)
            for a in acts:
                sub = tuple((p, rest[1:]) for p, rest in state.outcomes if rest[0] == a)
                if not sub:
                    continue
                prob = sum(p for p, _ in sub) / total
                nxt = _State((*state.prefix, a), (*state.policy, False), state.turns)
                if depth + 1 < horizon:
                    done = any(not rest for _, rest in sub)  # outcomes are prefix-free
                    nxt = nxt if done else _State(nxt.prefix, nxt.policy, nxt.turns, sub)
                    out.append((a_index[a], prob, nxt))
                else:
                    out.append((a_index[a], prob, None))
            return out
        forced = length_cap == "force-eos" and depth == horizon - 1
        for a in acts:
            if forced and a != eos:
                continue
            turns = state.turns + (a == eos)
            nxt = _State((*state.prefix, a), (*state.policy, True), turns)
            if depth + 1 == horizon:
                out.append((a_index[a], 1.0 if forced else 0.0, None))
            elif a != eos:
                out.append((a_index[a], 0.0, nxt))
            else:
                outcomes = reply(k, nxt)
                chance = (
                    None if outcomes is None else _State(nxt.prefix, nxt.policy, turns, outcomes)
                )
                out.append((a_index[a], 0.0, chance))
        return out

    nodes: list[tuple[int, tuple[int, ...]]] = []
    states: list[_State] = []
    rows: list[list[tuple[int, float, int]]] = []  # per node: (column, env prob, child id)
    responses: list[tuple[int, tuple[int, ...]]] = []
    resp_policy: list[tuple[bool, ...]] = []
    for k in range(len(keys)):
        level = [_State((), (), 0)]
        while level:
            nxt_level: list[_State] = []
            first = len(nodes)
            for state in level:
                nodes.append((k, state.prefix))
                states.append(state)
            for state in level:
                row: list[tuple[int, float, int]] = []
                for j, prob, child in successors(k, state):
                    if child is None:
                        responses.append((k, (*state.prefix, acts[j])))
                        resp_policy.append((*state.policy, state.outcomes is None))
                        row.append((j, prob, -1))
                    else:
                        row.append((j, prob, first + len(level) + len(nxt_level)))
                        nxt_level.append(child)
                rows.append(row)
            if len(responses) > MAX_RESPONSES:
                raise ValueError(
                    f"more than {MAX_RESPONSES} responses: the exact toolkit is for tiny trees"
                )
            level = nxt_level
    return _build(keys, acts, eos, horizon, length_cap, nodes, states, rows, responses, resp_policy)


def _build(
    prompts: tuple[tuple[int, ...], ...],
    acts: tuple[int, ...],
    eos: int,
    horizon: int,
    length_cap: str,
    nodes: list[tuple[int, tuple[int, ...]]],
    states: list[_State],
    rows: list[list[tuple[int, float, int]]],
    responses: list[tuple[int, tuple[int, ...]]],
    resp_policy: list[tuple[bool, ...]],
) -> ResponseTree:
    """The tensors of :class:`ResponseTree` from the enumerated nodes and responses."""
    a_n, n, h = len(acts), len(responses), horizon
    child = torch.full((len(nodes), a_n), -1, dtype=torch.long)
    env_prob = torch.zeros(len(nodes), a_n, dtype=torch.float64)
    for i, row in enumerate(rows):
        for j, prob, c in row:
            child[i, j] = c
            env_prob[i, j] = prob
    chance = torch.tensor([s.outcomes is not None for s in states], dtype=torch.bool)
    forced = torch.tensor(
        [
            s.outcomes is None and length_cap == "force-eos" and len(s.prefix) == h - 1
            for s in states
        ],
        dtype=torch.bool,
    )
    index = {node: i for i, node in enumerate(nodes)}
    a_index = {a: j for j, a in enumerate(acts)}
    tokens = torch.full((n, h), eos, dtype=torch.long)
    mask = torch.zeros((n, h), dtype=torch.bool)
    policy_mask = torch.zeros((n, h), dtype=torch.bool)
    node_of = torch.zeros((n, h), dtype=torch.long)
    action_of = torch.zeros((n, h), dtype=torch.long)
    passes = torch.zeros((len(nodes), n), dtype=torch.bool)
    for r, (k, toks) in enumerate(responses):
        for t, w in enumerate(toks):
            node = index[(k, toks[:t])]
            tokens[r, t], mask[r, t], policy_mask[r, t] = w, True, resp_policy[r][t]
            node_of[r, t], action_of[r, t] = node, a_index[w]
            passes[node, r] = True
    return ResponseTree(
        prompts=prompts,
        actions=acts,
        eos_token_id=eos,
        horizon=horizon,
        length_cap=length_cap,
        nodes=tuple(nodes),
        responses=tuple(responses),
        node_prompt=torch.tensor([k for k, _ in nodes], dtype=torch.long),
        node_depth=torch.tensor([len(p) for _, p in nodes], dtype=torch.long),
        forced=forced,
        chance=chance,
        env_prob=env_prob,
        child=child,
        resp_prompt=torch.tensor([k for k, _ in responses], dtype=torch.long),
        lengths=mask.sum(1),
        tokens=tokens,
        mask=mask,
        policy_mask=policy_mask,
        node_of=node_of,
        action_of=action_of,
        pair=node_of * a_n + action_of,
        passes=passes,
    )
