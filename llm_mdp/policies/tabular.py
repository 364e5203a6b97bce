"""``TabularPolicy``: one free logit vector per tree node, for exact tests.

A node is a state of the token MDP: a prompt plus a response prefix that has not ended,
i.e. contains no EOS and is shorter than the horizon ``H``. At the last position (prefix
length ``H - 1``) the policy may still pick any token; the env's length cap ends the
episode after it. The table has one row per node, so ``J(theta)`` and its gradient can be
enumerated exactly (``llm_mdp.theory``).

The interface matches :class:`~llm_mdp.policies.CausalLMPolicy` (``act``, ``log_probs``,
``vocab_size``, ``device``, ``temperature``, ``seed``), so env, agents and the theory
toolkit take either. Lookups are Python dicts: fine for the tiny vocabularies and
horizons this is for.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from .base import Observation, TeacherForced, as_obs_tensors, check_layout, token_log_probs
from .sampling import make_generator, sample_from_logits

__all__ = ["TabularPolicy"]

Node = tuple[tuple[int, ...], tuple[int, ...]]

MAX_NODES = 2_000_000


class TabularPolicy(TeacherForced, nn.Module):
    """Tabular softmax policy over a small vocabulary and horizon.

    Args:
        vocab_size: number of actions ``V`` (token ids ``0 .. V-1``, EOS among them).
        eos_token_id: the token that ends a response.
        horizon: ``H``, the longest response (the env's max response tokens).
        prompts: prompts as token-id sequences (distinct). Their ids are keys only and
            need not be < ``vocab_size``.
        seed: seed of the initial logits and of the sampler.
        init_scale: initial logits are ``init_scale * N(0, 1)``; 0 gives the uniform policy.
        temperature: > 0; actions and log-probs use ``softmax(logits / temperature)``.
        prompt_width: the env's ``P``. When None, ``act`` infers it from the observation
            (the one split of the rows into known prompt + response that all rows agree
            on) and keeps it in the returned state. ``log_probs`` always takes it.
        multi_turn: a row for every prefix shorter than ``horizon``, EOS and the
            environment's replies included (a multi-turn task goes on after a turn's EOS,
            ``llm_mdp.tasks.turns``); only the horizon ends a prefix. ``V^k`` rows per
            length ``k`` instead of ``(V-1)^k``.

    Attributes:
        logits: ``(num_nodes, V)`` parameter, row ``node_index(prompt, prefix)``.
    """

    def __init__(
        self,
        vocab_size: int,
        eos_token_id: int,
        horizon: int,
        prompts: Sequence[Sequence[int]],
        *,
        seed: int = 0,
        init_scale: float = 1.0,
        temperature: float = 1.0,
        prompt_width: int | None = None,
        multi_turn: bool = False,
    ) -> None:
        super().__init__()
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2 (EOS and one more token), got {vocab_size}")
        if not 0 <= eos_token_id < vocab_size:
            raise ValueError(
                f"eos_token_id={eos_token_id} is outside the vocabulary [0, {vocab_size})"
            )
        if horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {horizon}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        keys = [tuple(int(t) for t in p) for p in prompts]
        if not keys:
            raise ValueError("prompts is empty: give at least one prompt (a tuple of token ids)")
        if len(set(keys)) != len(keys):
            raise ValueError("prompts contains duplicates; give each prompt once")
        if any(len(p) == 0 for p in keys):
            raise ValueError("every prompt needs at least one token")
        self.multi_turn = bool(multi_turn)
        per_prompt = sum((vocab_size - (not multi_turn)) ** k for k in range(horizon))
        if per_prompt * len(keys) > MAX_NODES:
            raise ValueError(
                f"{per_prompt * len(keys)} nodes (vocab_size={vocab_size}, horizon={horizon}, "
                f"{len(keys)} prompts) exceed {MAX_NODES}; TabularPolicy is for tiny trees"
            )
        self._vocab_size = int(vocab_size)
        self.eos_token_id = int(eos_token_id)
        self.horizon = int(horizon)
        self.prompts: list[tuple[int, ...]] = keys
        self.temperature = float(temperature)
        self.top_k, self.top_p = 0, 1.0  # sampling truncation (behavior policy)
        self.prompt_width = prompt_width
        self._nodes: list[Node] = []
        for prompt in keys:
            self._nodes.extend((prompt, prefix) for prefix in self._prefixes())
        self._index: dict[Node, int] = {node: i for i, node in enumerate(self._nodes)}
        gen = torch.Generator().manual_seed(seed)
        init = init_scale * torch.randn(len(self._nodes), vocab_size, generator=gen)
        self.logits = nn.Parameter(init)
        self._seed = int(seed)
        self._generator: torch.Generator | None = None

    def _prefixes(self) -> Iterable[tuple[int, ...]]:
        """Non-terminal response prefixes, by length then lexicographically."""
        tokens = [t for t in range(self._vocab_size) if self.multi_turn or t != self.eos_token_id]
        level: list[tuple[int, ...]] = [()]
        for _ in range(self.horizon):
            yield from level
            level = [(*p, t) for p in level for t in tokens]

    # ------------------------------------------------------------------ nodes
    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def device(self) -> torch.device:
        return self.logits.device

    @property
    def num_nodes(self) -> int:
        return len(self._nodes)

    def nodes(self, prompt_ids: Sequence[int] | None = None) -> list[Node]:
        """All non-terminal nodes ``(prompt, prefix)`` in table-row order.

        With ``prompt_ids``, only that prompt's nodes (``sum_{k<H} (V-1)^k`` of them).
        """
        if prompt_ids is None:
            return list(self._nodes)
        key = tuple(int(t) for t in prompt_ids)
        return [n for n in self._nodes if n[0] == key]

    def node_index(self, prompt_ids: Sequence[int], response_prefix: Sequence[int]) -> int:
        """Table row of the node ``(prompt, prefix)``; KeyError for unknown/terminal nodes."""
        node = (tuple(int(t) for t in prompt_ids), tuple(int(t) for t in response_prefix))
        try:
            return self._index[node]
        except KeyError:
            raise KeyError(
                f"no node for prompt={node[0]} prefix={node[1]}: the prompt must be one of "
                f"the policy's prompts and the prefix must be shorter than horizon="
                f"{self.horizon}"
                + ("" if self.multi_turn else f" and contain no EOS ({self.eos_token_id})")
            ) from None

    def is_terminal(self, response_prefix: Sequence[int]) -> bool:
        """True when a response prefix has ended (contains EOS or reached the horizon; only
        the horizon for a ``multi_turn`` table)."""
        if len(response_prefix) >= self.horizon:
            return True
        return not self.multi_turn and self.eos_token_id in response_prefix

    def node_log_probs(self) -> torch.Tensor:
        """``(num_nodes, V)`` ``log_softmax(logits / temperature)``, differentiable."""
        return torch.log_softmax(self.logits / self.temperature, dim=-1)

    # ------------------------------------------------------------------ sampling
    def seed(self, seed: int) -> None:
        """Reseed the sampler (the table is left as it is)."""
        self._seed = int(seed)
        self._generator = None

    @property
    def generator(self) -> torch.Generator:
        dev = self.device
        if self._generator is None or self._generator.device.type != dev.type:
            self._generator = make_generator(dev, self._seed)
        return self._generator

    def _split_width(self, ids: list[list[int]], mask: list[list[int]]) -> int:
        """The ``P`` on which every row is a known prompt + response (must be unique)."""
        width = len(ids[0])
        common: set[int] | None = None
        for row, m in zip(ids, mask, strict=True):
            cols = [c for c in range(width) if m[c]]
            if not cols:
                raise ValueError("an observation row has no real token")
            start, real = cols[0], [row[c] for c in cols]
            cands = {start + len(p) for p in self.prompts if tuple(real[: len(p)]) == p}
            common = cands if common is None else common & cands
        if not common or len(common) > 1:
            raise ValueError(
                "cannot tell prompt from response in this observation "
                f"(candidate prompt widths {sorted(common or [])}); set "
                "TabularPolicy.prompt_width to the env's prompt width"
            )
        return common.pop()

    @torch.no_grad()
    def act(
        self,
        obs: Observation,
        state: Any = None,
        *,
        greedy: bool = False,
        uniforms: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Next token per row; same contract as :meth:`CausalLMPolicy.act`.

        Rows at a terminal prefix (EOS seen or horizon reached; the env has frozen them)
        get ``eos_token_id`` with log-prob 0. The returned state is the prompt width.
        """
        ids_t, mask_t = as_obs_tensors(obs, self.device)
        ids, mask = ids_t.tolist(), mask_t.tolist()
        width = self.prompt_width if self.prompt_width is not None else state
        if width is None:
            width = self._split_width(ids, mask)
        rows = []
        for row, m in zip(ids, mask, strict=True):
            prompt = [t for t, k in zip(row[:width], m[:width], strict=True) if k]
            prefix = [t for t, k in zip(row[width:], m[width:], strict=True) if k]
            rows.append(-1 if self.is_terminal(prefix) else self.node_index(prompt, prefix))
        idx = torch.tensor(rows, device=self.device)
        logits = self.logits[idx.clamp(min=0)]
        actions, logp = sample_from_logits(
            logits,
            temperature=self.temperature,
            greedy=greedy,
            generator=self.generator,
            uniforms=uniforms,
            top_k=self.top_k,
            top_p=self.top_p,
        )
        done = idx < 0
        actions = actions.masked_fill(done, self.eos_token_id)
        logp = logp.masked_fill(done, 0.0)
        return actions, logp, int(width)

    # ------------------------------------------------------------------ training
    def response_log_probs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        prompt_width: int,
        *,
        with_entropy: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(B, W - P)`` log-probs of the response tokens (0 on padding), differentiable.

        Same contract as :meth:`CausalLMPolicy.response_log_probs`: ``log softmax(logits /
        T)``; ``log_probs`` and ``log_probs_and_entropy`` call it.
        A real response token after EOS or past the horizon is an error.
        """
        check_layout(input_ids, attention_mask, prompt_width)
        ids, mask = input_ids.tolist(), attention_mask.tolist()
        resp_w = len(ids[0]) - prompt_width if ids else 0
        index = []
        for row, m in zip(ids, mask, strict=True):
            prompt = [t for t, k in zip(row[:prompt_width], m[:prompt_width], strict=True) if k]
            prefix: list[int] = []
            row_idx = []
            for t, k in zip(row[prompt_width:], m[prompt_width:], strict=True):
                if not k:
                    row_idx.append(0)
                    continue
                if self.is_terminal(prefix):
                    raise ValueError(
                        f"response {[*prefix, t]} of prompt {prompt} continues past EOS "
                        f"({self.eos_token_id}) or the horizon {self.horizon}"
                    )
                row_idx.append(self.node_index(prompt, prefix))
                prefix.append(t)
            index.append(row_idx)
        idx = torch.tensor(index, dtype=torch.long, device=self.device).reshape(len(ids), resp_w)
        logits = self.logits[idx] / self.temperature  # (B, R, V)
        dev = self.device
        return token_log_probs(
            logits,
            input_ids[:, prompt_width:].to(dev).long(),
            attention_mask[:, prompt_width:].to(dev),
            with_entropy,
        )
