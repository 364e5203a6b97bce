"""``CausalLMPolicy``: any Hugging Face causal LM as a token-MDP policy, with a KV cache.

Acting (``act``) is functional, like stable-baselines3's ``predict(obs, state)``: the
returned state holds the KV cache and a snapshot of what it has consumed. On the next
call the policy checks (one cheap elementwise comparison, one host sync) whether the new
observation is the old one plus, on each row, either exactly the token it returned
(a running row) or nothing (a frozen, finished row). Then it feeds only the new column;
otherwise (a row was reset, the batch changed, the state was already used) it prefills
again from the observation. Results never depend on which path ran.

Internal cache layout: every row's real tokens are compacted to the right of a
left-padded buffer, ``position_ids = cumsum(mask) - 1``, so each row sees exactly the
positions of an unpadded forward. Training log-probs (``log_probs``) are one
teacher-forced forward over the env's own layout, again with positions from the mask.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, replace
from typing import Any, Literal, overload

import torch
from torch import nn

from llm_mdp.utils import resolve_device

from .base import Observation, as_obs_tensors, check_layout, left_compact, token_log_probs
from .sampling import make_generator, sample_from_logits

__all__ = ["CausalLMPolicy", "KVState"]


@dataclass
class KVState:
    """What ``CausalLMPolicy.act`` carries between calls (treat as opaque).

    Attributes:
        cache: the model's KV cache (a ``transformers`` ``Cache``; updated in place by the
            next forward, so a state is valid for one call only).
        attention_mask: ``(B, L)`` internal left-padded mask of what the cache holds.
        lengths: ``(B,)`` number of real tokens consumed per row.
        end: ``(B,)`` obs column just after each row's last real token.
        obs_ids: ``(B, W)`` snapshot of the consumed observation (0 on padding).
        obs_mask: ``(B, W)`` its attention mask.
        actions: ``(B,)`` the actions returned by the call that produced this state.
        logits: ``(B, V)`` float32 next-token logits for the consumed observation.
        prefills: how many full prefills ran since the first call (diagnostics).
        steps: how many ``act`` calls this chain of states has seen.
    """

    cache: Any
    attention_mask: torch.Tensor
    lengths: torch.Tensor
    end: torch.Tensor
    obs_ids: torch.Tensor
    obs_mask: torch.Tensor
    actions: torch.Tensor
    logits: torch.Tensor
    prefills: int = 1
    steps: int = 1
    spent: bool = False


def _forward_params(model: Any) -> set[str]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT
    try:
        return set(inspect.signature(base.forward).parameters)
    except (TypeError, ValueError):
        return set()


class CausalLMPolicy(nn.Module):
    """A token-level policy over any ``transformers`` causal LM.

    Args:
        model: an ``AutoModelForCausalLM`` instance (any dtype/device).
        tokenizer: optional; kept for the env and for decoding, never needed to act.
        temperature: > 0. Actions are drawn from ``softmax(logits / temperature)`` and all
            log-probs (``act``, ``log_probs``) are of that distribution.
        vocab_size: number of actions. Default: the LM-head size. The LM head is often
            larger than the tokenizer (embedding rows padded to a multiple of 64/128, e.g.
            Qwen2); pass ``len(tokenizer)`` to restrict the policy to real tokens (the
            logits are cut to the first ``vocab_size`` entries and renormalised). The env
            checks that its action space and the policy agree and errors otherwise.
        device: move the model there (``"auto"``: CUDA when available). Default: leave it.
        seed: seed of the sampler's generator (default: drawn from the global RNG).

    The action set: with a tokenizer, special tokens other than EOS are not actions
    (:func:`llm_mdp.tasks.illegal_action_ids`, the env's rule): their logits are set to
    ``-inf`` in every forward, so ``act`` never samples them and ``log_probs`` is the
    distribution renormalised over the legal actions. Without a tokenizer every id is
    an action until :meth:`set_action_mask` says otherwise (the built-in agents pass the
    env's mask).

    Attributes:
        model, tokenizer, temperature, vocab_size, device, action_mask.
    """

    model: Any  # a transformers PreTrainedModel (or a wrapper such as a PEFT model)

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any = None,
        *,
        temperature: float = 1.0,
        vocab_size: int | None = None,
        device: str | torch.device | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.temperature = float(temperature)
        self.top_k, self.top_p = 0, 1.0  # sampling truncation (behavior policy)
        head = self.lm_head_size
        if vocab_size is not None and not 1 <= vocab_size <= head:
            raise ValueError(f"vocab_size={vocab_size} must be in [1, LM-head size {head}]")
        self._vocab_size = int(vocab_size) if vocab_size is not None else head
        if device is not None:
            self.to(resolve_device(device))
        params = _forward_params(model)
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._keep_kw = next(
            (k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None
        )
        self._seed = seed if seed is not None else int(torch.randint(0, 2**62, (1,)).item())
        self._generator: torch.Generator | None = None
        self._illegal: torch.Tensor | None = None
        if tokenizer is not None and hasattr(tokenizer, "all_special_ids"):
            from llm_mdp.tasks.base import illegal_action_ids

            self._set_illegal(illegal_action_ids(tokenizer))

    # ------------------------------------------------------------------ action set
    @property
    def action_mask(self) -> torch.Tensor:
        """``(vocab_size,)`` bool on CPU, True on the actions the policy can take."""
        mask = torch.ones(self._vocab_size, dtype=torch.bool)
        if self._illegal is not None:
            mask[self._illegal.cpu()] = False
        return mask

    def set_action_mask(self, mask: torch.Tensor) -> None:
        """Restrict the actions to ``mask`` (``(vocab_size,)`` bool, True = legal).

        Illegal tokens get probability 0 when acting and in ``log_probs``.
        """
        m = torch.as_tensor(mask, dtype=torch.bool).reshape(-1)
        if m.numel() != self._vocab_size or not bool(m.any()):
            raise ValueError(
                f"action mask has {m.numel()} entries ({int(m.sum())} legal); expected "
                f"{self._vocab_size} with at least one legal action"
            )
        self._set_illegal((~m).nonzero().flatten().tolist())

    def _set_illegal(self, ids: list[int]) -> None:
        ids = [i for i in ids if i < self._vocab_size]
        self._illegal = torch.tensor(ids, dtype=torch.long) if ids else None

    # ------------------------------------------------------------------ properties
    @property
    def lm_head_size(self) -> int:
        """Rows of the LM head (logits per position the model produces)."""
        head = (
            self.model.get_output_embeddings()
            if hasattr(self.model, "get_output_embeddings")
            else None
        )
        weight = getattr(head, "weight", None)
        if isinstance(weight, torch.Tensor):
            return int(weight.shape[0])
        return int(self.model.config.vocab_size)

    @property
    def vocab_size(self) -> int:
        """Number of actions (see the ``vocab_size`` constructor argument)."""
        return self._vocab_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def eos_token_id(self) -> int | None:
        """EOS id from the tokenizer, else from the model config (first one if a list)."""
        eos = getattr(self.tokenizer, "eos_token_id", None)
        if eos is None:
            eos = getattr(self.model.config, "eos_token_id", None)
        if isinstance(eos, (list, tuple)):
            eos = eos[0] if eos else None
        return None if eos is None else int(eos)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        tokenizer: bool | Any = True,
        temperature: float = 1.0,
        vocab_size: int | None = None,
        device: str | torch.device | None = "auto",
        seed: int | None = None,
        **model_kwargs: Any,
    ) -> CausalLMPolicy:
        """Load ``AutoModelForCausalLM.from_pretrained(name_or_path, **model_kwargs)``.

        Works offline for local folders (set ``HF_HUB_OFFLINE=1``). ``tokenizer=True`` also
        loads ``AutoTokenizer`` from the same place (``gguf_file`` is passed on to it);
        pass a tokenizer object or ``False`` otherwise. ``device="auto"`` picks CUDA when
        available.
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(name_or_path, **model_kwargs)
        tok: Any = tokenizer
        if tokenizer is True:
            tok_kwargs = {
                k: model_kwargs[k] for k in ("gguf_file", "revision") if k in model_kwargs
            }
            tok = AutoTokenizer.from_pretrained(name_or_path, **tok_kwargs)
        elif tokenizer is False:
            tok = None
        return cls(
            model.eval(),
            tok,
            temperature=temperature,
            vocab_size=vocab_size,
            device=device,
            seed=seed,
        )

    def seed(self, seed: int) -> None:
        """Reseed the sampler (a fresh generator on the current device)."""
        self._seed = int(seed)
        self._generator = None

    @property
    def generator(self) -> torch.Generator:
        """The sampler's generator, (re)created on the model's device when needed."""
        dev = self.device
        if self._generator is None or self._generator.device.type != dev.type:
            self._generator = make_generator(dev, self._seed)
        return self._generator

    # ------------------------------------------------------------------ model calls
    def _forward(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        pos: torch.Tensor,
        *,
        keep: int,
        cache: Any = None,
        use_cache: bool,
    ) -> tuple[torch.Tensor, Any]:
        kwargs: dict[str, Any] = {
            "input_ids": ids,
            "attention_mask": mask,
            "position_ids": pos,
            "use_cache": use_cache,
        }
        if cache is not None:
            kwargs[self._cache_kw] = cache
        if self._keep_kw is not None and keep > 0:
            kwargs[self._keep_kw] = keep
        out = self.model(**kwargs)
        logits = out.logits
        if keep > 0 and logits.shape[1] > keep:  # the model ignored logits_to_keep
            logits = logits[:, -keep:]
        new_cache = None
        if use_cache:
            new_cache = getattr(out, "cache", None)
            if new_cache is None:
                new_cache = getattr(out, "past_key_values", None)
        logits = logits[..., : self._vocab_size]
        if self._illegal is not None:  # not actions: probability 0 (see the class docstring)
            if self._illegal.device != logits.device:
                self._illegal = self._illegal.to(logits.device)
            logits = logits.index_fill(-1, self._illegal, float("-inf"))
        return logits, new_cache

    # ------------------------------------------------------------------ acting
    @torch.no_grad()
    def act(
        self,
        obs: Observation,
        state: KVState | None = None,
        *,
        greedy: bool = False,
        uniforms: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, KVState]:
        """Choose the next token of every row.

        Args:
            obs: ``{"input_ids": (B, W), "attention_mask": (B, W)}`` in the env layout
                (real tokens of a row are contiguous); moved to the policy's device.
            state: the state returned by the previous call, or ``None``. A state is valid
                for one call (the cache is updated in place); reusing one, or an
                observation that is not "previous + returned action / unchanged" on every
                row, triggers a full prefill (same results, more compute).
            greedy: argmax instead of sampling.
            uniforms: ``(B,)`` draws in ``[0, 1)`` to sample with instead of the policy's
                generator (counter-based randomness, see ``sampling.sample_categorical``).

        Returns:
            ``actions (B,)`` int64, ``log_probs (B,)`` float32 under
            ``softmax(logits / temperature)`` (for greedy too: the log-prob of the argmax
            token under the same tempered distribution, which is what ``log_probs`` gives
            for it), and the new state. Rows whose observation did not change since the
            last call (finished rows the env froze) get a fresh draw from their unchanged
            distribution; the env ignores it.
        """
        ids, mask = as_obs_tensors(obs, self.device)
        new_state = None
        if state is not None and not state.spent and state.obs_ids.shape == ids.shape:
            new_state = self._extend(state, ids, mask)
        if new_state is None:
            new_state = self._prefill(ids, mask)
            if state is not None:
                new_state.prefills += state.prefills
                new_state.steps += state.steps
        if state is not None:
            state.spent = True
        actions, logp = sample_from_logits(
            new_state.logits,
            temperature=self.temperature,
            greedy=greedy,
            generator=self.generator,
            uniforms=uniforms,
            top_k=self.top_k,
            top_p=self.top_p,
        )
        new_state.actions = actions
        return actions, logp, new_state

    def _prefill(self, ids: torch.Tensor, mask: torch.Tensor) -> KVState:
        batch, width = ids.shape
        c_ids, c_mask, pos = left_compact(ids, mask)
        logits, cache = self._forward(c_ids, c_mask, pos, keep=1, use_cache=True)
        end = width - mask.flip(1).argmax(1)
        return KVState(
            cache=cache,
            attention_mask=c_mask,
            lengths=mask.sum(1),
            end=end,
            obs_ids=ids.masked_fill(mask == 0, 0),
            obs_mask=mask.clone(),
            actions=torch.zeros(batch, dtype=torch.long, device=ids.device),
            logits=logits[:, -1].float(),
        )

    def _extend(self, st: KVState, ids: torch.Tensor, mask: torch.Tensor) -> KVState | None:
        """Incremental step, or None when the observation is not a one-token extension."""
        batch, width = ids.shape
        rows = torch.arange(batch, device=ids.device)
        lengths = mask.sum(1)
        grew = lengths == st.lengths + 1
        same = lengths == st.lengths
        col = st.end.clamp(max=width - 1)
        exp_mask = st.obs_mask.clone()
        exp_mask[rows, col] = torch.where(grew, 1, exp_mask[rows, col])
        exp_ids = st.obs_ids.clone()
        exp_ids[rows, col] = torch.where(grew, st.actions, exp_ids[rows, col])
        masked_ids = ids.masked_fill(mask == 0, 0)
        ok = (
            (grew | same).all()
            & (~grew | (st.end < width)).all()
            & (mask == exp_mask).all()
            & (masked_ids == exp_ids).all()
        )
        ok_, any_grew, all_grew = torch.stack([ok, grew.any(), grew.all()]).tolist()
        if not ok_:
            return None
        if not any_grew:  # nothing new: every row is frozen
            return replace(st, steps=st.steps + 1, spent=False)
        new_tok = torch.where(grew, masked_ids[rows, col], 0).unsqueeze(1)
        c_mask = torch.cat([st.attention_mask, grew.long().unsqueeze(1)], dim=1)
        pos = st.lengths.unsqueeze(1)
        logits, cache = self._forward(new_tok, c_mask, pos, keep=1, cache=st.cache, use_cache=True)
        last = logits[:, -1].float()
        return KVState(
            cache=cache,
            attention_mask=c_mask,
            lengths=lengths,
            end=st.end + grew.long(),
            obs_ids=masked_ids,
            obs_mask=mask.clone(),
            actions=st.actions,
            logits=last if all_grew else torch.where(grew.unsqueeze(1), last, st.logits),
            prefills=st.prefills,
            steps=st.steps + 1,
        )

    # ------------------------------------------------------------------ training
    @overload
    def log_probs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        prompt_width: int,
        *,
        with_entropy: Literal[False] = ...,
    ) -> torch.Tensor: ...

    @overload
    def log_probs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        prompt_width: int,
        *,
        with_entropy: Literal[True],
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    @overload
    def log_probs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        prompt_width: int,
        *,
        with_entropy: bool,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]: ...

    def log_probs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        prompt_width: int,
        *,
        with_entropy: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced log-probs of the response tokens: one batched forward.

        Args:
            input_ids: ``(B, W)`` env layout (prompt right-aligned in ``[0, P)``, response
                left-aligned in ``[P, W)``).
            attention_mask: ``(B, W)``, 1 on real tokens.
            prompt_width: ``P``.
            with_entropy: also return the per-position entropy.

        Returns:
            ``(B, W - P)`` ``log softmax(logits / temperature)`` of each response token
            (0 where the response mask is 0), differentiable w.r.t. the model parameters;
            with ``with_entropy`` also the ``(B, W - P)`` entropy of that distribution.
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
            return (empty, empty.clone()) if with_entropy else empty
        pos = (mask.cumsum(1) - 1).clamp_(min=0)
        # the last column is only a target: leave it out of the forward, and keep exactly
        # the R positions that predict the response (no (B, R+1, V) logits to slice)
        logits, _ = self._forward(
            ids[:, :-1].masked_fill(mask[:, :-1] == 0, 0),
            mask[:, :-1],
            pos[:, :-1],
            keep=resp_w,
            use_cache=False,
        )
        if logits.dtype in (torch.float16, torch.bfloat16):  # half precision: softmax in fp32
            logits = logits.float()
        if self.temperature != 1.0:  # skip a (B, R, V) copy forward and backward at T = 1
            logits = logits / self.temperature  # (B, R, V); float64 models stay float64
        return token_log_probs(logits, ids[:, prompt_width:], resp_mask, with_entropy)
