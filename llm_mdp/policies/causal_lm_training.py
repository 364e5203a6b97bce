"""The training side of ``CausalLMPolicy``: teacher-forced log-probs, entropy and hidden
states over the env's layout, with the LM head applied densely or in chunks.

One batched forward per call, positions from the mask (``cumsum(mask) - 1``), so each row
sees exactly the positions of an unpadded forward. Above ``CHUNKED_HEAD_MIN_ELEMENTS``
logits the head runs in chunks (:mod:`llm_mdp.policies.lm_head`): no dense ``(B, R, V)``
tensor is kept for backward.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import hf
from .base import TeacherForced, check_layout, token_log_probs
from .lm_head import CHUNK_ELEMENTS, head_token_log_probs

__all__ = ["TeacherForcedLM"]


class TeacherForcedLM(TeacherForced):
    """Mixin of :class:`~llm_mdp.policies.CausalLMPolicy` (which sets the attributes
    below): :meth:`response_log_probs`, :meth:`log_probs_and_hidden`,
    :meth:`response_hidden`."""

    CHUNKED_HEAD_MIN_ELEMENTS = 2 * CHUNK_ELEMENTS
    """With ``chunked_head=None``, ``log_probs`` chunks the head above this many logits
    (48 MiB in float32: two chunks, so chunking at least halves the logits kept)."""

    model: nn.Module
    temperature: float
    chunked_head: bool | None
    _vocab_size: int
    _head_ok: bool | None
    _illegal: torch.Tensor | None

    if TYPE_CHECKING:

        @property
        def device(self) -> torch.device: ...

        def _forward(
            self,
            ids: torch.Tensor,
            mask: torch.Tensor,
            pos: torch.Tensor,
            *,
            keep: int,
            cache: Any = None,
            use_cache: bool,
        ) -> tuple[torch.Tensor, Any]: ...

    def response_log_probs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        prompt_width: int,
        *,
        with_entropy: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher-forced log-probs of the response tokens: one batched forward
        (``log_probs`` and ``log_probs_and_entropy`` call it).

        Args:
            input_ids: ``(B, W)`` env layout (prompt right-aligned in ``[0, P)``, response
                left-aligned in ``[P, W)``).
            attention_mask: ``(B, W)``, 1 on real tokens.
            prompt_width: ``P``.
            with_entropy: also return the per-position entropy.

        Returns:
            ``(B, W - P)`` ``log softmax(logits / temperature)`` of each response token
            (0 where the response mask is 0), differentiable w.r.t. the model parameters;
            and, with ``with_entropy``, the ``(B, W - P)`` entropy of that distribution
            (else ``None``).
            Logits are computed only for the ``R`` positions that predict the response
            when the model supports ``logits_to_keep``.
        """
        check_layout(input_ids, attention_mask, prompt_width)
        dev = self.device
        ids = input_ids.to(dev).long()
        mask = attention_mask.to(dev).long()
        resp_w = ids.shape[1] - prompt_width
        resp_mask = mask[:, prompt_width:]
        if resp_w == 0:
            empty = ids.new_zeros((ids.shape[0], 0), dtype=torch.float32)
            return empty, (empty.clone() if with_entropy else None)
        pos = (mask.cumsum(1) - 1).clamp_(min=0)
        inputs = (ids[:, :-1].masked_fill(mask[:, :-1] == 0, 0), mask[:, :-1], pos[:, :-1])
        targets = ids[:, prompt_width:]
        if self._use_chunked_head(ids.shape[0] * resp_w, inputs):
            hidden = self._hidden(*inputs)[:, -resp_w:]
            return self._head_log_probs(hidden, targets, resp_mask, with_entropy, chunked=True)
        # the last column is only a target: leave it out of the forward, and keep exactly
        # the R positions that predict the response (no (B, R+1, V) logits to slice)
        logits, _ = self._forward(*inputs, keep=resp_w, use_cache=False)
        if logits.dtype in (torch.float16, torch.bfloat16):  # half precision: softmax in fp32
            logits = logits.float()
        if self.temperature != 1.0:  # skip a (B, R, V) copy forward and backward at T = 1
            logits = logits / self.temperature  # (B, R, V); float64 models stay float64
        return token_log_probs(logits, targets, resp_mask, with_entropy)

    def log_probs_and_hidden(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        prompt_width: int,
        *,
        with_entropy: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """:meth:`response_log_probs` and :meth:`response_hidden` from one trunk forward.

        For a value head on the policy's own trunk (PPO's ``critic="shared"``). The
        log-probs are the same function of the weights as :meth:`response_log_probs`
        (trunk + LM head, chunked by the same rule), so a loss on the hidden states
        changes them only through the trunk's weights.

        Returns:
            ``(logp, entropy, hidden)``: ``(B, W - P)`` log-probs, the entropy or ``None``
            (as :meth:`response_log_probs`) and the ``(B, W - P, H)`` hidden states.
        """
        hidden = self.response_hidden(input_ids, attention_mask, prompt_width)
        dev = self.device
        ids, mask = input_ids.to(dev).long(), attention_mask.to(dev).long()
        B, resp_w = hidden.shape[:2]
        if resp_w == 0:
            empty = ids.new_zeros((B, 0), dtype=torch.float32)
            return empty, (empty.clone() if with_entropy else None), hidden
        chunked = self.chunked_head is True or (
            self.chunked_head is None
            and B * resp_w * self._vocab_size >= self.CHUNKED_HEAD_MIN_ELEMENTS
        )
        logp, ent = self._head_log_probs(
            hidden, ids[:, prompt_width:], mask[:, prompt_width:], with_entropy, chunked=chunked
        )
        return logp, ent, hidden

    def response_hidden(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int
    ) -> torch.Tensor:
        """``(B, W - P, H)`` the trunk's last hidden states that predict the response tokens:
        column ``j`` encodes the state ``s_j`` (prompt + the first ``j`` response tokens).

        Raises:
            ValueError: the model has no separate trunk and linear LM head that reproduce
                its logits (a scaled or soft-capped head), so its hidden states are not
                the LM head's input.
        """
        check_layout(input_ids, attention_mask, prompt_width)
        dev = self.device
        ids, mask = input_ids.to(dev).long(), attention_mask.to(dev).long()
        resp_w = ids.shape[1] - prompt_width
        if resp_w == 0:
            return torch.zeros(ids.shape[0], 0, hf.hidden_size(self.model), device=dev)
        pos = (mask.cumsum(1) - 1).clamp_(min=0)
        inputs = (ids[:, :-1].masked_fill(mask[:, :-1] == 0, 0), mask[:, :-1], pos[:, :-1])
        if self._head_ok is None:
            self._head_ok = self._check_head(inputs)
        if not self._head_ok:
            raise ValueError(
                f"{type(self.model).__name__}: the LM head applied to the trunk's last hidden "
                "state does not reproduce the model's logits, so the trunk's hidden states "
                "are not the policy's features"
            )
        return self._hidden(*inputs)[:, -resp_w:]

    def _head_log_probs(
        self,
        hidden: torch.Tensor,
        targets: torch.Tensor,
        resp_mask: torch.Tensor,
        with_entropy: bool,
        *,
        chunked: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token log-probs (and entropy) of ``(B, R, H)`` hidden states through the LM head."""
        head = hf.lm_head(self.model)
        assert isinstance(head, nn.Linear)
        weight: torch.Tensor = head.weight
        bias: torch.Tensor | None = head.bias
        V = self._vocab_size
        if weight.shape[0] > V:  # a slice's backward allocates a zero (rows, H) gradient
            weight, bias = weight[:V], None if bias is None else bias[:V]
        return head_token_log_probs(
            hidden,
            weight,
            bias,
            targets,
            resp_mask,
            temperature=self.temperature,
            illegal=self._illegal_mask(hidden.device),
            with_entropy=with_entropy,
            chunked=chunked,
        )

    def _hidden(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """``(B, W, H)`` last hidden states of the trunk (the LM head's input)."""
        body = hf.trunk(self.model)
        assert body is not None
        out = body(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
        return out[0]

    def _use_chunked_head(
        self, n_positions: int, inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    ) -> bool:
        """Whether ``log_probs`` takes the chunked head (see ``chunked_head``)."""
        if self.chunked_head is False:
            return False
        if self.chunked_head is None and (
            n_positions * self._vocab_size < self.CHUNKED_HEAD_MIN_ELEMENTS
        ):
            return False
        if self._head_ok is None:
            self._head_ok = self._check_head(inputs)
            if not self._head_ok:
                msg = (
                    f"{type(self.model).__name__}: the LM head applied to the trunk's last "
                    "hidden state does not reproduce the model's logits (a scaled or "
                    "soft-capped head?); log_probs uses the dense logits"
                )
                if self.chunked_head:
                    raise ValueError(f"chunked_head=True is not possible: {msg}")
                warnings.warn(msg, stacklevel=3)
        return self._head_ok

    @torch.no_grad()
    def _check_head(self, inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> bool:
        """One row through both paths: trunk + linear head must give the model's logits."""
        head = hf.lm_head(self.model)
        if not isinstance(head, nn.Linear) or hf.trunk(self.model) is None:
            return False
        one = tuple(x[:1] for x in inputs)
        try:
            dense, _ = self._forward(*one, keep=1, use_cache=False)
            mine = head(self._hidden(*one)[:, -1:])[..., : self._vocab_size]
        except Exception:  # a trunk that does not take these arguments
            return False
        illegal = self._illegal_mask(dense.device)
        if illegal is not None:  # -inf in the dense logits: compare the actions only
            dense, mine = dense[..., ~illegal], mine[..., ~illegal]
        dense, mine = dense.double(), mine.double()
        scale = dense.abs().max().clamp(min=1.0)
        return bool(((dense - mine).abs().max() / scale) < 1e-3)

    def _illegal_mask(self, device: torch.device) -> torch.Tensor | None:
        """``(vocab_size,)`` bool on ``device``, True on tokens that are not actions."""
        if self._illegal is None:
            return None
        mask = torch.zeros(self._vocab_size, dtype=torch.bool, device=device)
        return mask.index_fill_(0, self._illegal.to(device), True)
