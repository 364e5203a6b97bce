"""The policy interface shared by env, agents and the exact toolkit.

Observation layout (the vector env's torch backend; ``W = P + R``):

* ``obs["input_ids"]``: ``(B, W)`` int64. Prompt right-aligned (left-padded) in columns
  ``[0, P)``, response so far left-aligned (right-padded) in ``[P, W)``.
* ``obs["attention_mask"]``: ``(B, W)`` int64, 1 on real tokens, 0 on padding.

So each row's real tokens are one contiguous span of columns. ``act`` never needs ``P``
(it only reads the span); ``log_probs`` takes ``prompt_width=P`` to know which tokens are
the response.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import torch

__all__ = ["Observation", "Policy", "TeacherForced", "left_compact", "match_action_set"]

Observation = Mapping[str, torch.Tensor]


@runtime_checkable
class Policy(Protocol):
    """What agents need from a policy: batched acting and teacher-forced log-probs.

    Implemented by :class:`~llm_mdp.policies.CausalLMPolicy` (any Hugging Face causal LM)
    and :class:`~llm_mdp.policies.TabularPolicy` (exact tests).
    """

    temperature: float

    @property
    def vocab_size(self) -> int:
        """Size of the action space (number of logits)."""
        ...

    @property
    def device(self) -> torch.device:
        """Device of the parameters; observations are moved here."""
        ...

    def act(
        self,
        obs: Observation,
        state: Any = None,
        *,
        greedy: bool = False,
        uniforms: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """Next token per row: ``(actions (B,), log_probs (B,), new_state)``.

        ``state`` is whatever the previous call returned (``None`` on the first call); it
        is consumed by the call (pass the returned one on). ``uniforms`` (``(B,)`` in
        ``[0, 1)``), when given, replace the policy's own generator for the draw. ``log_probs`` are those of the
        sampling distribution ``softmax(logits / temperature)``, also for ``greedy=True``.
        """
        ...

    def log_probs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int
    ) -> torch.Tensor:
        """``(B, W - P)`` log-prob of each response token (0 on padding), differentiable."""
        ...

    def log_probs_and_entropy(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`log_probs` and the ``(B, W - P)`` entropy of the policy at each response
        position (0 on padding), from the same forward."""
        ...

    def seed(self, seed: int) -> None:
        """Reseed the sampler's generator."""
        ...


def as_obs_tensors(obs: Observation, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` from an observation, as int64 on ``device``."""
    try:
        ids, mask = obs["input_ids"], obs["attention_mask"]
    except (KeyError, TypeError) as err:
        raise ValueError(
            "observation must be a mapping with 'input_ids' and 'attention_mask', got "
            f"{type(obs).__name__} with keys {list(obs) if isinstance(obs, Mapping) else '-'}"
        ) from err
    ids = torch.as_tensor(ids, device=device).long()
    mask = torch.as_tensor(mask, device=device).long()
    if ids.dim() == 1:
        ids, mask = ids.unsqueeze(0), mask.unsqueeze(0)
    if ids.dim() != 2 or ids.shape != mask.shape:
        raise ValueError(
            f"expected input_ids and attention_mask of equal shape (B, W), got "
            f"{tuple(ids.shape)} and {tuple(mask.shape)}"
        )
    return ids, mask


def check_layout(input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int) -> None:
    """Shape checks for ``log_probs`` inputs (no device sync)."""
    if input_ids.dim() != 2 or input_ids.shape != attention_mask.shape:
        raise ValueError(
            f"expected input_ids and attention_mask of equal shape (B, W), got "
            f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}"
        )
    width = input_ids.shape[1]
    if not 1 <= prompt_width <= width:
        raise ValueError(
            f"prompt_width={prompt_width} must be in [1, W={width}] (the prompt needs at "
            "least one column: the first response token is predicted from it)"
        )


def token_log_probs(
    logits: torch.Tensor, targets: torch.Tensor, resp_mask: torch.Tensor, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Masked ``log_softmax(logits)`` at ``targets`` and optionally the entropy.

    Args:
        logits: ``(B, R, V)`` float, temperature already applied.
        targets: ``(B, R)`` token ids (any value where ``resp_mask`` is 0).
        resp_mask: ``(B, R)``, 1 on real response tokens.
        with_entropy: also compute ``-(p * log p).sum(-1)``.

    Returns:
        ``(B, R)`` log-probs, 0 on padding, and the ``(B, R)`` entropy (0 on padding), or
        ``None`` without ``with_entropy``.
    """
    keep = resp_mask.bool()
    logp_all = torch.log_softmax(logits, dim=-1)
    tgt = targets.masked_fill(~keep, 0).unsqueeze(-1)
    logp = logp_all.gather(-1, tgt).squeeze(-1).masked_fill(~keep, 0.0)
    if not with_entropy:
        return logp, None
    # clamp: a -inf logit (masked token) has p = 0 and must add 0, not 0 * -inf = nan.
    finite = logp_all.clamp(min=torch.finfo(logp_all.dtype).min)
    entropy = -(logp_all.exp() * finite).sum(-1).masked_fill(~keep, 0.0)
    return logp, entropy


class TeacherForced:
    """``log_probs`` and ``log_probs_and_entropy`` (the :class:`Policy` protocol) from one
    method, :meth:`response_log_probs`, that a policy class implements."""

    def response_log_probs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        prompt_width: int,
        *,
        with_entropy: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(log-probs, entropy or None)``, each ``(B, W - P)``, 0 on padding."""
        raise NotImplementedError

    def log_probs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int
    ) -> torch.Tensor:
        """``(B, W - P)`` log-prob of each response token (0 on padding), differentiable."""
        return self.response_log_probs(input_ids, attention_mask, prompt_width, with_entropy=False)[
            0
        ]

    def log_probs_and_entropy(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`log_probs` and the ``(B, W - P)`` entropy at each response position."""
        logp, entropy = self.response_log_probs(
            input_ids, attention_mask, prompt_width, with_entropy=True
        )
        assert entropy is not None
        return logp, entropy


def left_compact(
    ids: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Re-lay rows for a causal LM: padding to the left, real tokens in order to the right.

    A stable sort of the 0/1 mask moves padding left while keeping token order; the
    result is trimmed to the longest row. Returns ``(ids, mask, position_ids)`` with
    ``position_ids = cumsum(mask) - 1`` so positions match an unpadded forward.

    Raises:
        ValueError: a row has no real token (a causal LM needs at least one).
    """
    width = ids.shape[1]
    lengths = mask.sum(1)
    longest, shortest = (int(v) for v in torch.stack([lengths.max(), lengths.min()]).tolist())
    if shortest == 0:
        empty = (lengths == 0).nonzero().flatten().tolist()
        raise ValueError(
            f"rows {empty} of the observation have no real token (attention_mask all 0); "
            "a causal LM needs at least one (e.g. a BOS token in the prompt)"
        )
    order = torch.argsort(mask, dim=1, stable=True)[:, width - longest :]
    c_mask = mask.gather(1, order)
    c_ids = ids.gather(1, order).masked_fill(c_mask == 0, 0)
    return c_ids, c_mask, (c_mask.cumsum(1) - 1).clamp_(min=0)


def match_action_set(
    policy: Any, tokenizer: Any, action_mask: torch.Tensor, task_name: str = "task"
) -> None:
    """Check that ``policy`` acts on ``tokenizer``'s ids and the env's action set, or give
    a tokenizer-free policy that action set (``set_action_mask``).

    Args:
        policy: the policy an agent will train.
        tokenizer: the env's tokenizer.
        action_mask: ``(V,)`` bool, the env's legal actions (``env.action_mask``).
        task_name: named in the errors.

    Raises:
        ValueError: the policy was built on another tokenizer (even one of the same size:
            ids would mean other text), or it could emit a token the env rejects.
    """
    tok = getattr(policy, "tokenizer", None)
    if (
        tok is not None
        and tok is not tokenizer
        and hasattr(tok, "get_vocab")
        and tok.get_vocab() != tokenizer.get_vocab()
    ):
        raise ValueError(
            f"the policy's tokenizer ({type(tok).__name__}, {len(tok)} tokens) is not the "
            f"env's (task {task_name!r}): token ids would mean other text; build the "
            "policy with env.tokenizer"
        )
    legal = action_mask.cpu()
    mask = getattr(policy, "action_mask", None)
    if mask is None:
        if not bool(legal.all()):
            raise ValueError(
                f"task {task_name!r} has {int((~legal).sum())} token(s) that are not "
                f"actions (special tokens other than EOS), but {type(policy).__name__} has no "
                "action_mask to exclude them; use CausalLMPolicy or add action_mask/"
                "set_action_mask to your policy"
            )
        return
    if not torch.equal(torch.as_tensor(mask).cpu(), legal):
        if tok is None and hasattr(policy, "set_action_mask"):
            policy.set_action_mask(legal)
        else:
            raise ValueError(
                f"the policy's action set ({int(torch.as_tensor(mask).sum())} legal tokens) "
                f"differs from the env's ({int(legal.sum())}); build both from one tokenizer"
            )
