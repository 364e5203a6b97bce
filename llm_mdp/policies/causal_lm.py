"""``CausalLMPolicy``: any Hugging Face causal LM as a token-MDP policy, with a KV cache.

Acting (``act``) is functional, like stable-baselines3's ``predict(obs, state)``: the
returned state holds the KV cache and a snapshot of what it has consumed. On the next
call the policy checks (one cheap elementwise comparison, one host sync) whether the new
observation is the old one plus, on each row, the token it returned and possibly tokens
a multi-turn env appended after it (a running row), or nothing (a frozen, finished
row). Then it feeds only the new columns;
otherwise (a row was reset, the batch changed, the state was already used) it prefills
again from the observation. Results never depend on which path ran.

Internal cache layout: every row's real tokens are compacted to the right of a
left-padded buffer, ``position_ids = cumsum(mask) - 1``, so each row sees exactly the
positions of an unpadded forward. Training log-probs (``log_probs``) are one
teacher-forced forward over the env's own layout, again with positions from the mask.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from llm_mdp.utils import resolve_device

from . import hf
from .base import Observation, as_obs_tensors, left_compact
from .causal_lm_training import TeacherForcedLM
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


class CausalLMPolicy(TeacherForcedLM, nn.Module):
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
        chunked_head: how ``log_probs`` applies the LM head. ``True``: in chunks of
            ``CHUNK_ELEMENTS`` logits with a log-softmax per chunk, recomputed in
            backward (:mod:`llm_mdp.policies.lm_head`), so no dense ``(B, R, V)`` tensor
            is kept; ``False``: the model's own dense logits. ``None`` (default): chunked
            when the dense logits of a call would exceed ``CHUNKED_HEAD_MIN_ELEMENTS``
            (48 MiB in float32: e.g. 250 response tokens at a 50k vocabulary) and the
            model has a plain linear head whose output is its logits (checked once,
            numerically, on the first such call). Both give the same numbers up to
            float round-off.

    The action set: with a tokenizer, special tokens other than EOS are not actions
    (:func:`llm_mdp.tasks.illegal_action_ids`, the env's rule): their logits are set to
    ``-inf`` in every forward, so ``act`` never samples them and ``log_probs`` is the
    distribution renormalised over the legal actions. Without a tokenizer every id is
    an action until :meth:`set_action_mask` says otherwise (the built-in agents pass the
    env's mask).

    Attributes:
        model, tokenizer, temperature, vocab_size, device, action_mask.
        positions_encoded: positions run through full prefills by ``act`` so far
            (padding included: it is computed); ``positions_decoded``: positions run
            through incremental steps (one per row on a plain step; a multi-turn env's
            reply adds its length, padded to the longest in the batch). Cost
            accounting for benchmarks.
    """

    model: Any  # a transformers PreTrainedModel (or a wrapper such as a PEFT model)

    MAX_CACHE_WIDTH_FACTOR = 2
    """``act`` re-prefills when the KV cache would be wider than this many observation
    widths (multi-turn replies of different lengths leave masked holes in it)."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any = None,
        *,
        temperature: float = 1.0,
        vocab_size: int | None = None,
        device: str | torch.device | None = None,
        seed: int | None = None,
        chunked_head: bool | None = None,
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
        params = hf.forward_params(model)
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._keep_kw = hf.logits_to_keep_kw(model)
        self.chunked_head = chunked_head
        self._head_ok: bool | None = None  # whether trunk + head reproduce the logits
        self._seed = seed if seed is not None else int(torch.randint(0, 2**62, (1,)).item())
        self._generator: torch.Generator | None = None
        self.positions_encoded = 0  # acting: positions through full prefills (padding too)
        self.positions_decoded = 0  # acting: positions through incremental steps
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
        return hf.lm_head_size(self.model)

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

    @torch.no_grad()
    def prefill(self, obs: Observation, repeats: int = 1) -> KVState:
        """Encode ``obs`` once and return the state of ``obs`` with each row repeated.

        The returned state is what ``act`` would hold after consuming
        ``obs.repeat_interleave(repeats)``: pass it to ``act`` with that observation and
        the first draw comes from the stored logits, without a forward. Each distinct
        start state is encoded once and its KV cache is forked ``repeats`` ways (TRePO's
        ``K`` value rollouts from one prefix).

        Args:
            obs: ``(n, W)`` observation in the env layout.
            repeats: copies of each row (consecutive).

        Returns:
            A :class:`KVState` for ``n * repeats`` rows.
        """
        if repeats < 1:
            raise ValueError(f"repeats={repeats}, expected >= 1")
        ids, mask = as_obs_tensors(obs, self.device)
        if repeats == 1:
            return self._prefill(ids, mask)
        st = self._prefill(ids, mask)
        fork = getattr(st.cache, "batch_repeat_interleave", None)
        if fork is None:  # a cache type that cannot fork: encode every copy instead
            rep = ids.repeat_interleave(repeats, 0), mask.repeat_interleave(repeats, 0)
            return self._prefill(*rep)
        fork(repeats)  # in place
        return _state_rows(st, _repeated(len(st.lengths), repeats, st.lengths.device))

    @torch.no_grad()
    def prefix_state(
        self, source: KVState, rows: torch.Tensor, obs: Observation, repeats: int = 1
    ) -> KVState | None:
        """The state of ``obs`` with each row repeated, read from ``source``'s KV cache.

        Row ``j`` of ``obs`` must start a sequence that row ``rows[j]`` of ``source`` has
        consumed (same layout: same prompt, response a prefix of that row's). Its tokens but
        the last are copied from ``source``'s cache, in the layout a prefill gives them,
        and only its last token runs through the model: what :meth:`prefill` gives, up to
        float round-off, at one position per row instead of the whole prefix. TRePO's value
        rollouts start from the main rollout's cache this way. ``source`` is not changed.

        Args:
            source: a state from :meth:`act` (e.g. :attr:`Rollout.policy_state`).
            rows: ``(n,)`` row of ``source`` that each row of ``obs`` is a prefix of.
            obs: ``(n, W)`` observation in the env layout ``source`` saw.
            repeats: copies of each row (consecutive), as in :meth:`prefill`.

        Returns:
            A :class:`KVState` for ``n * repeats`` rows, or ``None`` (then use
            :meth:`prefill`) when a row of ``obs`` is not such a prefix or ``source``'s
            cache cannot be copied by row (:func:`~llm_mdp.policies.hf.cache_rows`).
        """
        if repeats < 1:
            raise ValueError(f"repeats={repeats}, expected >= 1")
        ids, mask = as_obs_tensors(obs, self.device)
        n, width = ids.shape
        rows = rows.to(ids.device)
        if rows.shape != (n,) or source.obs_ids.shape[1] != width or n == 0:
            return None
        lengths = mask.sum(1)
        end = width - mask.flip(1).argmax(1)  # column after each row's last token
        ids = ids.masked_fill(mask == 0, 0)
        # every column before a row's last token: as the source row had it
        before = torch.arange(width, device=ids.device)[None, :] < (end - 1)[:, None]
        same = (mask == source.obs_mask[rows]) & (ids == source.obs_ids[rows])
        if not bool((same | ~before).all() & (lengths >= 1).all()):
            return None
        # the cache entries of each prefix but its last token, right-aligned as a prefill
        # lays them out (a stable sort puts the dropped columns first, in order)
        held = source.attention_mask[rows]
        keep = held * (held.cumsum(1) <= (lengths - 1)[:, None])
        w = int((lengths - 1).max())
        if w == 0:
            return None
        columns = torch.sort(keep, dim=1, stable=True).indices[:, -w:]
        cache = hf.cache_rows(source.cache, rows, columns)
        if cache is None:
            return None
        last = ids.gather(1, (end - 1)[:, None])
        c_mask = torch.cat([keep.gather(1, columns), torch.ones_like(last)], dim=1)
        self.positions_decoded += n
        logits, cache = self._forward(
            last, c_mask, (lengths - 1)[:, None], keep=1, cache=cache, use_cache=True
        )
        st = KVState(
            cache=cache,
            attention_mask=c_mask,
            lengths=lengths,
            end=end,
            obs_ids=ids,
            obs_mask=mask.clone(),
            actions=torch.zeros(n, dtype=torch.long, device=ids.device),
            logits=logits[:, -1].float(),
        )
        if repeats == 1:
            return st
        cache.batch_repeat_interleave(repeats)  # in place, on our own copy
        return _state_rows(st, _repeated(n, repeats, ids.device))

    def select_rows(self, state: KVState, rows: torch.Tensor) -> KVState | None:
        """The state of rows ``rows`` of ``state`` only (the next :meth:`act` then takes
        the observation of those rows). ``state``'s cache is cut in place, so ``state``
        itself is spent; ``None`` when the cache type cannot select rows."""
        select = getattr(state.cache, "batch_select_indices", None)
        if select is None or state.spent:
            return None
        rows = rows.to(state.lengths.device)
        select(rows)
        state.spent = True
        return _state_rows(state, rows)

    def _prefill(self, ids: torch.Tensor, mask: torch.Tensor) -> KVState:
        batch, width = ids.shape
        c_ids, c_mask, pos = left_compact(ids, mask)
        self.positions_encoded += c_ids.numel()
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
        """Incremental step, or None when the observation is not an extension of the
        consumed one.

        An extension: every row grew by ``n_i >= 0`` tokens right after its last one, the
        first being the action this state returned (``n_i = 1`` on a plain step; more when
        a multi-turn env appended its reply in the same step; 0 on a frozen row) and
        nothing else changed. The ragged new tokens run through one forward on top of
        the cache, right-aligned in a block of ``max n_i`` columns (padding before them
        has mask 0, so the cache keeps a hole there that no query attends to; positions
        continue from each row's cache length), so the cache carries on across the
        environment's tokens instead of re-encoding the row. Each such step widens every
        row's cache by ``max n_i``; once the cache would be wider than
        ``MAX_CACHE_WIDTH_FACTOR`` observation widths (so at least half holes), ``act``
        prefills instead, which compacts it. A single-turn episode never gets there.
        """
        batch, width = ids.shape
        lengths = mask.sum(1)
        n = lengths - st.lengths
        cols = torch.arange(width, device=ids.device)[None, :]
        grown = (cols >= st.end[:, None]) & (cols < (st.end + n)[:, None])
        masked_ids = ids.masked_fill(mask == 0, 0)
        first = masked_ids.gather(1, st.end.clamp(max=width - 1)[:, None]).squeeze(1)
        ok = (
            (n >= 0).all()
            & (st.end + n <= width).all()
            & (mask == (st.obs_mask | grown.long())).all()
            & ((masked_ids == st.obs_ids) | grown).all()
            & ((n == 0) | (first == st.actions)).all()
        )
        ok_, m, all_grew = torch.stack([ok.long(), n.max(), (n > 0).all().long()]).tolist()
        if not ok_:
            return None
        if m == 0:  # nothing new: every row is frozen
            return replace(st, steps=st.steps + 1, spent=False)
        if st.attention_mask.shape[1] + m > self.MAX_CACHE_WIDTH_FACTOR * width:
            return None  # mostly holes: one prefill compacts the cache again
        # block column q holds the row's new token j = q - (m - n_i) when j >= 0
        j = torch.arange(m, device=ids.device)[None, :] - (m - n)[:, None]
        real = j >= 0
        src = (st.end[:, None] + j).clamp(0, width - 1)
        new_tok = torch.where(real, masked_ids.gather(1, src), 0)
        pos = st.lengths[:, None] + j.clamp(min=0)  # padding: any position, masked
        c_mask = torch.cat([st.attention_mask, real.long()], dim=1)
        self.positions_decoded += batch * m
        logits, cache = self._forward(new_tok, c_mask, pos, keep=1, cache=st.cache, use_cache=True)
        last = logits[:, -1].float()
        return KVState(
            cache=cache,
            attention_mask=c_mask,
            lengths=lengths,
            end=st.end + n,
            obs_ids=masked_ids,
            obs_mask=mask.clone(),
            actions=st.actions,
            logits=last if all_grew else torch.where((n > 0).unsqueeze(1), last, st.logits),
            prefills=st.prefills,
            steps=st.steps + 1,
        )


def _repeated(n: int, repeats: int, device: torch.device) -> torch.Tensor:
    """``[0]*repeats + [1]*repeats + ...``: the row index of ``repeat_interleave``."""
    return torch.arange(n, device=device).repeat_interleave(repeats)


def _state_rows(st: KVState, index: torch.Tensor) -> KVState:
    """``st`` with every per-row tensor taken at ``index`` (a selection or a repetition of
    rows); the cache is ``st``'s, which the caller has already cut or forked to match."""
    return KVState(
        cache=st.cache,
        attention_mask=st.attention_mask[index],
        lengths=st.lengths[index],
        end=st.end[index],
        obs_ids=st.obs_ids[index],
        obs_mask=st.obs_mask[index],
        actions=st.actions[index],
        logits=st.logits[index],
        prefills=st.prefills,
        steps=st.steps,
    )
