"""Collecting episodes from the vector env through ``reset`` / ``step`` only.

Randomness is counter-based (:mod:`llm_mdp.agents.streams`): the uniform that samples the
token at position ``c`` of a row is a hash of ``(stream id of the row, c)``. A row's
episode therefore depends only on its stream id -- not on the batch it runs in, the order
of rows, or how many processes share the work -- which makes data-parallel runs equal
single-process runs, lets value rollouts be batched any way, and makes resuming a run
need no generator state. The environment's random replies of a multi-turn task draw from
a stream of their own derived from the row's (``reply_streams`` at reset), so they too
depend only on the row's stream id.

Multi-turn episodes: the env appends its replies inside ``step``, so a row's response
grows by more than one token on such steps. The rollout reads each row's next column from
the observation, records log-probs only where the policy chose the token, and keeps the
env's ``policy_mask``: :attr:`Rollout.response_mask` is 1 on the policy's tokens only, so
every agent's loss, KL, advantages and aggregation skip the injected tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch

from llm_mdp.agents.streams import counter_uniforms, stream_ids
from llm_mdp.envs import LLMTokenVectorEnv
from llm_mdp.policies import Policy

REPLY_STREAM_KEY = 0x5E91
"""Key part that derives a row's reply stream from its token stream."""

__all__ = [
    "REPLY_STREAM_KEY",
    "EnvPool",
    "Rollout",
    "counter_uniforms",
    "rollout",
    "rollout_many",
    "rollout_prefixes",
    "stream_ids",
]


@dataclass
class Rollout:
    """One batch of finished episodes, in the env's layout, trimmed to the longest response.

    Attributes:
        input_ids: ``(B, P + L)`` the final observations (prompt right-aligned in ``P``
            columns, response from column ``P``), ``L`` = longest response in the batch.
        attention_mask: ``(B, P + L)``.
        prompt_width: ``P``.
        rewards: ``(B,)`` float32, the sum of the step rewards = ``RM(W)`` under ZRA.
        sample_logp: ``(B, L)`` log-probs of the sampled tokens under the rollout policy
            (the ``old`` log-probs of PPO-style ratios), 0 on padding.
        prompt_indices: ``(B,)`` index of each row's prompt in the task's pool.
        group_size: rows per prompt (contiguous).
        token_rewards: ``(B, L)`` true token rewards when the task reports them.
        advantages: ``(B, L)`` the per-token weights of the update (set by the loop).
        ref_logp: ``(B, L)`` log-probs of the frozen reference policy (KL).
        behavior_logp: ``(B, L)`` log-probs of the sampler when it is not ``pi``
            (temperature, top-k, top-p); ``sample_logp`` is then ``pi``'s own.
        baseline: ``(B,)`` a per-response baseline (ReMax: the greedy response's reward).
        values: ``(B, L)`` critic values ``V(s_t)`` (PPO).
        returns: ``(B, L)`` the critic's regression targets (PPO).
        prefix_values: ``(B, L + 1)`` Monte Carlo values, column ``c`` = ``V_hat`` after
            ``c`` response tokens (TRePO).
        prefix_known: ``(B, L + 1)`` bool, where ``prefix_values`` holds an estimate.
        next_values: ``(B, L)`` independent estimates of ``V(s_{t+1})`` (TRePO with
            ``value_estimates="fresh"``), NaN where there is none.
        value_rollouts: episodes run for value estimates in this batch (TRePO).
        policy_mask: ``(B, L)`` int64, 1 on the response tokens the policy chose, 0 on
            tokens the environment injected (multi-turn tasks) and on padding; ``None``:
            every response token is the policy's (:attr:`response_mask` then falls back
            to the attention mask).
        extras: free-form per-agent data for users' own agents (per-row tensors are
            kept by :meth:`select`); the built-in agents use the typed fields above.
        policy_state: the policy's state after its last ``act`` of the batch
            (``rollout(..., keep_state=True)``; :class:`~llm_mdp.policies.CausalLMPolicy`:
            a KV cache of every row's tokens but its last), from which value rollouts
            can start without encoding their prefixes again; dropped by :meth:`select`.

    Prefix columns (``prefix_values``, ``prefix_known``, ``next_values``) are indexed by
    *decision state*: column ``k`` is the state before the policy's ``k``-th token (see
    :meth:`decision_columns`); for a single-turn task that is the response column.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_width: int
    rewards: torch.Tensor
    sample_logp: torch.Tensor
    prompt_indices: torch.Tensor
    group_size: int = 1
    token_rewards: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None
    behavior_logp: torch.Tensor | None = None
    baseline: torch.Tensor | None = None
    values: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    prefix_values: torch.Tensor | None = None
    prefix_known: torch.Tensor | None = None
    next_values: torch.Tensor | None = None
    value_rollouts: int = 0
    policy_mask: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    policy_state: Any = None

    ROW_FIELDS: ClassVar[tuple[str, ...]] = (
        "rewards",
        "sample_logp",
        "prompt_indices",
        "token_rewards",
        "advantages",
        "ref_logp",
        "behavior_logp",
        "baseline",
        "values",
        "returns",
        "prefix_values",
        "prefix_known",
        "next_values",
        "policy_mask",
    )
    """The fields that hold one row per response (besides the observation)."""

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def response_ids(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_width :]

    @property
    def response_mask(self) -> torch.Tensor:
        """``(B, L)`` 1 on the response tokens the policy chose (EOS included): what
        log-probs, KL, advantages and aggregation count. Injected tokens of a multi-turn
        task are 0 (:attr:`token_mask` has them)."""
        if self.policy_mask is not None:
            return self.policy_mask
        return self.attention_mask[:, self.prompt_width :]

    @property
    def token_mask(self) -> torch.Tensor:
        """``(B, L)`` 1 on every response token, the environment's included."""
        return self.attention_mask[:, self.prompt_width :]

    @property
    def response_lengths(self) -> torch.Tensor:
        """``(B,)`` response lengths in the layout (injected tokens included)."""
        return self.token_mask.sum(-1)

    @property
    def multi_turn(self) -> bool:
        """Whether some response holds tokens the environment injected."""
        return self.policy_mask is not None and not torch.equal(
            self.policy_mask.bool(), self.token_mask.bool()
        )

    def decision_columns(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Where the decision states are: ``(columns (B, L + 1), valid (B, L + 1))``.

        ``columns[i, k]`` is the response column of row ``i``'s ``k``-th policy token
        (so the prefix ``response[:columns[i, k]]`` is the state the policy chose it in);
        at ``k = T_i`` (the number of policy tokens) it is the row's full length, the
        terminal state. ``valid`` is True for ``k <= T_i``. Single-turn: ``columns[i, k]
        = k``. A prefix ending inside a reply is never a decision state.
        """
        pm = self.response_mask.bool()
        B, L = pm.shape
        n = pm.sum(-1)
        cols = torch.arange(L + 1, device=pm.device).expand(B, L + 1).clone()
        # the k-th policy column of each row: a stable sort puts policy columns first
        key = torch.where(pm, 0, 1)
        order = torch.sort(key, dim=1, stable=True).indices
        k = torch.arange(L, device=pm.device).expand(B, L)
        inside = k < n[:, None]
        cols[:, :L] = torch.where(inside, order, cols[:, :L])
        cols.scatter_(1, n[:, None], self.response_lengths[:, None])
        valid = torch.arange(L + 1, device=pm.device)[None, :] <= n[:, None]
        return cols, valid

    def ended_with_eos(self, eos_token_id: int) -> torch.Tensor:
        """``(B,)`` bool: the response's last token is EOS (it stopped before the cap)."""
        last = (self.response_lengths - 1).clamp(min=0).unsqueeze(1)
        ended = self.response_ids.gather(1, last).squeeze(1) == eos_token_id
        return ended & (self.response_lengths > 0)

    def require(self, name: str) -> torch.Tensor:
        """The typed field ``name``, which an earlier stage must have set."""
        value = getattr(self, name)
        if not isinstance(value, torch.Tensor):
            raise RuntimeError(f"Rollout.{name} is not set: the stage that computes it has not run")
        return value

    def select(self, rows: torch.Tensor) -> Rollout:
        """The sub-batch ``rows`` (index tensor), extras included where they are per-row."""
        n = len(self)

        def pick(x: Any) -> Any:
            return x[rows] if isinstance(x, torch.Tensor) and x.shape[:1] == (n,) else x

        return replace(
            self,
            input_ids=self.input_ids[rows],
            attention_mask=self.attention_mask[rows],
            extras={k: pick(v) for k, v in self.extras.items()},
            policy_state=None,
            **{k: pick(getattr(self, k)) for k in self.ROW_FIELDS},
        )


@torch.no_grad()
def rollout(
    env: LLMTokenVectorEnv,
    policy: Policy,
    options: dict[str, Any],
    *,
    greedy: bool = False,
    streams: torch.Tensor | None = None,
    fork: int = 1,
    resume: tuple[Any, torch.Tensor] | None = None,
    keep_state: bool = False,
    compact: bool = False,
) -> Rollout:
    """Reset ``env`` with ``options`` and step it with ``policy`` until every row has ended.

    The policy's KV cache is carried across steps; rewards are summed from the step
    rewards the env pays (0.0 until a row ends, then ``RM(W)``). Every env row must be
    covered by ``options`` (``prompt_indices`` x ``group_size``). With ``streams``
    (``(B,)`` ids from :func:`stream_ids`) the draws are counter-based; without, the
    policy's own generator draws.

    ``fork = K > 1`` declares that the start states come in runs of ``K`` equal rows
    (e.g. ``group_size=K`` and equal response prefixes). A policy with a
    ``prefill(obs, repeats)`` method (:class:`~llm_mdp.policies.CausalLMPolicy`) then
    encodes each distinct start state once and forks its KV cache ``K`` ways; the
    episodes are the same as without ``fork`` (same draws, same log-probs up to float
    round-off of the batched forward), only cheaper.

    ``resume = (state, rows)``: start state ``j`` (of the ``B / fork`` distinct ones) is a
    prefix of what row ``rows[j]`` of an earlier rollout's ``policy_state`` consumed; a
    policy with ``prefix_state`` (:meth:`~llm_mdp.policies.CausalLMPolicy.prefix_state`)
    then starts from that KV cache instead of encoding the prefix (same episodes again).
    ``keep_state`` keeps the policy's final state in :attr:`Rollout.policy_state`.

    ``compact``: once a quarter of the rows the policy runs have ended, a policy with
    ``select_rows`` (:meth:`~llm_mdp.policies.CausalLMPolicy.select_rows`) drops them
    from its batch and KV cache, so finished rows stop costing forwards (the env still
    holds every row). Only with ``streams`` or ``greedy``, where a row's draws are its
    own: the episodes are the same, only cheaper.
    """
    if streams is not None and env.task.multi_turn and "reply_streams" not in options:
        options = {**options, "reply_streams": stream_ids(REPLY_STREAM_KEY, rows=streams)}
    obs, _ = env.reset(options=options)
    B, P = env.num_envs, env.P
    device = env.device
    logp = torch.zeros((B, env.R), dtype=torch.float32, device=device)
    rewards = torch.zeros(B, dtype=torch.float64, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    token_rewards = None
    state = _resumed_state(policy, obs, fork, *resume) if resume is not None else None
    if state is None and fork > 1:
        state = _forked_state(policy, obs, fork)
    rows = torch.arange(B, device=device)
    col = obs["attention_mask"][:, P:].sum(-1)
    select = getattr(policy, "select_rows", None) if streams is not None or greedy else None
    live = rows  # the rows the policy acts on (all, unless compacted)
    while True:
        u = None if streams is None or greedy else counter_uniforms(streams, col)
        if compact and select is not None and state is not None:
            running_live = ~done[live]
            if 4 * int((~running_live).sum()) >= len(live):
                state = select(state, running_live.nonzero().squeeze(1))
                live = live[running_live]
        if len(live) < B:
            part = {k: v[live] for k, v in obs.items()}
            a, lp_live, state = policy.act(
                part, state, greedy=greedy, uniforms=u[live] if u is not None else None
            )
            actions = torch.full((B,), env.eos_token_id, dtype=torch.long, device=device)
            actions[live] = a.to(device)
            lp = torch.zeros(B, dtype=torch.float32, device=device)
            lp[live] = lp_live.to(device, torch.float32)
        else:
            actions, lp, state = policy.act(obs, state, greedy=greedy, uniforms=u)
        running = ~done
        logp[rows[running], col[running]] = lp.to(device, torch.float32)[running]
        obs, r, term, trunc, info = env.step(actions)
        col = obs["attention_mask"][:, P:].sum(-1)  # the env's replies move it on too
        rewards += r
        if "token_rewards" in info:
            tr, has = info["token_rewards"], info["_token_rewards"]
            token_rewards = torch.zeros_like(tr) if token_rewards is None else token_rewards
            token_rewards[has] = tr[has]
        done = done | term | trunc
        if bool(done.all()):
            break
    ids, mask = obs["input_ids"], obs["attention_mask"]
    L = int(mask[:, P:].sum(-1).max())
    policy_mask = obs["policy_mask"][:, P : P + L] if env.task.multi_turn else None
    return Rollout(
        input_ids=ids[:, : P + L],
        attention_mask=mask[:, : P + L],
        prompt_width=P,
        rewards=rewards.float(),
        sample_logp=logp[:, :L] * mask[:, P : P + L],
        policy_mask=policy_mask,
        prompt_indices=env.prompt_index.clone(),
        group_size=int(options.get("group_size") or 1),
        token_rewards=None if token_rewards is None else token_rewards[:, :L].float(),
        policy_state=state if keep_state else None,
    )


def _distinct_starts(obs: Any, fork: int) -> dict[str, torch.Tensor]:
    """The first row of each run of ``fork`` equal rows of ``obs`` (checked)."""
    ids, mask = obs["input_ids"], obs["attention_mask"]
    B, W = ids.shape
    if B % fork:
        raise ValueError(f"fork={fork} does not divide the env's {B} rows")
    runs = ids.masked_fill(mask == 0, 0).view(B // fork, fork, W), mask.view(B // fork, fork, W)
    if not all(bool((x == x[:, :1]).all()) for x in runs):
        raise ValueError(f"fork={fork}: the start states do not come in runs of {fork} equal rows")
    return {"input_ids": ids[::fork], "attention_mask": mask[::fork]}


def _forked_state(policy: Policy, obs: Any, fork: int) -> Any:
    """The policy's state for ``obs`` whose rows come in runs of ``fork`` equal rows, built
    from one prefill of the distinct rows (``None`` when the policy cannot fork)."""
    prefill = getattr(policy, "prefill", None)
    if prefill is None:
        return None
    return prefill(_distinct_starts(obs, fork), repeats=fork)


def _resumed_state(policy: Policy, obs: Any, fork: int, source: Any, rows: torch.Tensor) -> Any:
    """The policy's state for ``obs`` (runs of ``fork`` equal rows) from the earlier state
    ``source`` whose row ``rows[j]`` starts with distinct start state ``j``; ``None`` when
    the policy or its cache cannot resume (the caller then encodes the start states)."""
    resume = getattr(policy, "prefix_state", None)
    if resume is None or source is None:
        return None
    return resume(source, rows, _distinct_starts(obs, fork), repeats=fork)


class EnvPool:
    """Envs like ``env`` (same task, prompt width, length cap, device) in any batch size,
    built once per size and kept, so a batch of start states runs without padded copies.

    Attributes:
        env: the template (returned itself for its own size).
    """

    def __init__(self, env: LLMTokenVectorEnv, max_sizes: int = 4) -> None:
        self.env = env
        self.max_sizes = max_sizes
        self._envs: dict[int, LLMTokenVectorEnv] = {}
        self._retired_episodes = 0
        self._retired_tokens = 0

    def get(self, num_envs: int) -> LLMTokenVectorEnv:
        """An env with ``num_envs`` rows (built on first use; the oldest size is dropped
        once more than ``max_sizes`` are kept)."""
        if num_envs == self.env.num_envs:
            return self.env
        if num_envs not in self._envs:
            if len(self._envs) >= self.max_sizes:
                oldest = next(iter(self._envs))
                retired = self._envs.pop(oldest)
                self._retired_episodes += retired.episodes_finished
                self._retired_tokens += retired.tokens_generated
            self._envs[num_envs] = self.env.resized(num_envs)
        return self._envs[num_envs]

    @property
    def episodes_finished(self) -> int:
        """Episodes the pool's own envs (not the template) have ended."""
        return self._retired_episodes + sum(e.episodes_finished for e in self._envs.values())

    @property
    def tokens_generated(self) -> int:
        """Tokens the pool's own envs (not the template) have generated."""
        return self._retired_tokens + sum(e.tokens_generated for e in self._envs.values())


def rollout_prefixes(
    envs: EnvPool,
    policy: Policy,
    prompt_indices: Sequence[int],
    prefixes: Sequence[Sequence[int]],
    *,
    copies: int = 1,
    streams: torch.Tensor | None = None,
    batch_size: int | None = None,
    source: tuple[Any, Sequence[int]] | None = None,
) -> torch.Tensor:
    """Rewards ``(n, copies)``: ``copies`` episodes from each ``(prompt, response prefix)``.

    The work is laid out for speed only; the episodes do not depend on it:

    * each start state is encoded once and its KV cache forked ``copies`` ways
      (``rollout(..., fork=copies)``), or not encoded at all: with ``source`` it starts
      from the KV cache of the rollout that produced it (``rollout(..., resume=...)``);
    * rows leave the policy's batch as they end (``rollout(..., compact=True)``);
    * start states are sorted by prefix length, longest first, and cut into env batches
      of at most ``batch_size`` rows (default: all in one batch), so rows that can still
      run long share a batch and short ones finish together;
    * the last batch is as small as it needs to be (no padded copies).

    Args:
        envs: where to get envs of each batch size.
        policy: the rollout policy.
        prompt_indices: ``n`` prompt indices into the task's pool.
        prefixes: ``n`` response prefixes (token ids, no EOS).
        copies: episodes per start state ``K``.
        streams: ``(n * copies,)`` stream ids, episode ``(j, k)`` at ``j * copies + k``;
            with them every episode's draws are its own whatever the batching.
        batch_size: most env rows per batch (rounded down to a multiple of ``copies``).
        source: ``(policy_state, rows)``: the :attr:`Rollout.policy_state` of the batch
            the prefixes come from and, per start state, its row there.

    Returns:
        ``(n, copies)`` float32 rewards.
    """
    n, K = len(prompt_indices), copies
    if len(prefixes) != n:
        raise ValueError(f"{n} prompt indices but {len(prefixes)} prefixes")
    if streams is not None and streams.shape != (n * K,):
        raise ValueError(f"streams has shape {tuple(streams.shape)}, expected ({n * K},)")
    device = envs.env.device
    out = torch.zeros((n, K), dtype=torch.float32, device=device)
    per_batch = n if batch_size is None else max(1, batch_size // K)
    order = sorted(range(n), key=lambda j: -len(prefixes[j]))
    for lo in range(0, n, per_batch):
        jobs = order[lo : lo + per_batch]
        options = {
            "prompt_indices": [prompt_indices[j] for j in jobs],
            "group_size": K,
            "response_prefix": [list(prefixes[j]) for j in jobs for _ in range(K)],
        }
        s = None
        if streams is not None:
            idx = torch.tensor(jobs, device=streams.device)
            s = streams.view(n, K)[idx].reshape(-1)
        resume = None
        if source is not None:
            resume = (source[0], torch.tensor([source[1][j] for j in jobs], device=device))
        env = envs.get(len(jobs) * K)
        ro = rollout(env, policy, options, streams=s, fork=K, resume=resume, compact=True)
        out[torch.tensor(jobs, device=device)] = ro.rewards.view(len(jobs), K)
    return out


def rollout_many(
    env: LLMTokenVectorEnv,
    policy: Policy,
    prompt_indices: list[int],
    prefixes: list[list[int]],
    *,
    greedy: bool = False,
    streams: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rewards ``(n,)`` of one episode from each ``(prompt, response prefix)`` start state.

    Runs ``ceil(n / num_envs)`` env batches; the last one is padded with copies of the
    first start state, whose results are dropped. Used for TRePO's Monte Carlo values.
    ``streams`` (``(n,)``) makes each episode's randomness its own, whatever the chunking.
    """
    n, B = len(prompt_indices), env.num_envs
    out = []
    for lo in range(0, n, B):
        idx, pre = prompt_indices[lo : lo + B], prefixes[lo : lo + B]
        k = len(idx)
        idx, pre = idx + [idx[0]] * (B - k), pre + [pre[0]] * (B - k)
        s = None
        if streams is not None:
            s = streams[lo : lo + B]
            s = torch.cat([s, s[:1].expand(B - k)])
        options = {"prompt_indices": idx, "response_prefix": pre}
        ro = rollout(env, policy, options, greedy=greedy, streams=s)
        out.append(ro.rewards[:k])
    return torch.cat(out) if out else torch.zeros(0, device=env.device)
