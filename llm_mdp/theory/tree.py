"""Exhaustive enumeration of the response tree of a small token MDP.

A *node* is a state ``s_t`` that still has a decision to make: a prompt plus a response
prefix that has not ended. A *response* is a leaf: a prefix that ended, at EOS or at the
length cap. Two length-cap conventions are supported (``length_cap``):

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

Tensors use the conventions of :mod:`llm_mdp.estimators`: responses are rows, position
``t`` (1-based) is column ``t - 1``, padded to width ``H`` with a right-padded mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

__all__ = ["LENGTH_CAPS", "LengthCap", "ResponseTree", "enumerate_tree"]

LengthCap = Literal["env", "force-eos"]
LENGTH_CAPS: tuple[str, ...] = ("env", "force-eos")

MAX_RESPONSES = 200_000


@dataclass(frozen=True, eq=False)
class ResponseTree:
    """Every node and every response of the token MDP for some prompts (policy-free).

    Attributes:
        prompts: prompt token ids, one tuple per prompt (prompt ``k`` has index ``k``).
        actions: token ids the policy may emit, EOS among them (``A = len(actions)``).
        eos_token_id: the token that ends a response.
        horizon: ``H``, the most tokens a response can have.
        length_cap: ``"env"`` or ``"force-eos"`` (module docstring).
        nodes: ``(prompt_index, prefix)`` per node, by prompt, then depth, then lexicographic.
        responses: ``(prompt_index, tokens)`` per response.
        node_prompt, node_depth: ``(n_nodes,)`` long.
        forced: ``(n_nodes,)`` bool, nodes whose only action is EOS (``"force-eos"``).
        child: ``(n_nodes, A)`` long, the node reached by each action, ``-1`` if it ends.
        resp_prompt, lengths: ``(N,)`` long.
        tokens: ``(N, H)`` long token ids (``eos_token_id`` on padding).
        mask: ``(N, H)`` bool, right-padded.
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
    child: torch.Tensor = field(repr=False)
    resp_prompt: torch.Tensor = field(repr=False)
    lengths: torch.Tensor = field(repr=False)
    tokens: torch.Tensor = field(repr=False)
    mask: torch.Tensor = field(repr=False)
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
        return (
            f"{self.num_responses} responses, {self.num_nodes} nodes "
            f"({int(self.forced.sum())} forced), {len(self.prompts)} prompt(s), "
            f"{self.num_actions} actions, horizon {self.horizon}, length_cap={self.length_cap!r}"
        )


def enumerate_tree(
    prompts: Sequence[Sequence[int]],
    actions: Sequence[int],
    eos_token_id: int,
    horizon: int,
    length_cap: str = "env",
) -> ResponseTree:
    """Enumerate every node and response (see the module docstring for ``length_cap``).

    Args:
        prompts: prompt token-id sequences (distinct, non-empty).
        actions: the tokens the policy may emit (EOS must be one of them); the policy is
            renormalised over them (e.g. a subset of a larger vocabulary).
        eos_token_id: the EOS id.
        horizon: ``H >= 1`` (``>= 2`` for ``"force-eos"`` to leave a choice).
        length_cap: ``"env"`` or ``"force-eos"``.
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
    eos = int(eos_token_id)
    others = [a for a in acts if a != eos]
    n_est = len(keys) * sum(len(others) ** k for k in range(horizon + 1)) * len(acts)
    if n_est > MAX_RESPONSES:
        raise ValueError(
            f"about {n_est} responses for {len(acts)} actions and horizon {horizon}: the exact "
            f"toolkit is for tiny trees (at most {MAX_RESPONSES})"
        )
    nodes: list[tuple[int, tuple[int, ...]]] = []
    for k in range(len(keys)):
        level: list[tuple[int, ...]] = [()]
        for _ in range(horizon):
            nodes.extend((k, p) for p in level)
            level = [(*p, a) for p in level for a in others]
    index = {n: i for i, n in enumerate(nodes)}
    a_n = len(acts)
    child = torch.full((len(nodes), a_n), -1, dtype=torch.long)
    forced = torch.zeros(len(nodes), dtype=torch.bool)
    responses: list[tuple[int, tuple[int, ...]]] = []
    for i, (k, prefix) in enumerate(nodes):
        is_forced = length_cap == "force-eos" and len(prefix) == horizon - 1
        forced[i] = is_forced
        for j, a in enumerate(acts):
            if is_forced and a != eos:
                continue
            nxt = (*prefix, a)
            if a == eos or len(nxt) == horizon:
                responses.append((k, nxt))
            else:
                child[i, j] = index[(k, nxt)]
    n, h = len(responses), horizon
    tokens = torch.full((n, h), eos, dtype=torch.long)
    mask = torch.zeros((n, h), dtype=torch.bool)
    node_of = torch.zeros((n, h), dtype=torch.long)
    action_of = torch.zeros((n, h), dtype=torch.long)
    passes = torch.zeros((len(nodes), n), dtype=torch.bool)
    a_index = {a: j for j, a in enumerate(acts)}
    for r, (k, toks) in enumerate(responses):
        for t, w in enumerate(toks):
            node = index[(k, toks[:t])]
            tokens[r, t], mask[r, t] = w, True
            node_of[r, t], action_of[r, t] = node, a_index[w]
            passes[node, r] = True
    return ResponseTree(
        prompts=keys,
        actions=acts,
        eos_token_id=eos,
        horizon=horizon,
        length_cap=length_cap,
        nodes=tuple(nodes),
        responses=tuple(responses),
        node_prompt=torch.tensor([k for k, _ in nodes], dtype=torch.long),
        node_depth=torch.tensor([len(p) for _, p in nodes], dtype=torch.long),
        forced=forced,
        child=child,
        resp_prompt=torch.tensor([k for k, _ in responses], dtype=torch.long),
        lengths=mask.sum(1),
        tokens=tokens,
        mask=mask,
        node_of=node_of,
        action_of=action_of,
        pair=node_of * a_n + action_of,
        passes=passes,
    )
