"""Built-in tasks, each with a known optimum so that learning can be asserted.

=================  ==========================================================  =======
name               reward ``RM(W)``                                             optimum
=================  ==========================================================  =======
``target_token``   fraction of the ``T_max`` slots filled with the target      1.0
``keyword``        1 if the response contains the keyword, else 0               1.0
``reverse``        1 if the response is the prompt reversed (or partial credit)  1.0
``arithmetic``     1 if the response is the sum ``a+b`` written in digits        1.0
``hidden_rewards`` ``sum_t gamma^(t-1) r(s_t, w_t)`` for hidden token rewards   by DP
=================  ==========================================================  =======

``hidden_rewards`` is the set-up of the paper's Theorem 1: true token-level rewards
exist and are reported in ``info``, but the learner only gets their discounted sum at
the end. Everything is built locally on character tokenizers; the text tasks
(``target_token``, ``keyword``, ``reverse``, ``arithmetic``) also take any Hugging Face
``tokenizer=`` so that a pretrained model can play them.

Reward functions are small module-level callables (not closures), so every built-in task,
and an env holding one, pickles: ``SubprocVecEnv``/``AsyncVectorEnv`` workers and
``copy.deepcopy`` get the same rewards.
"""

from __future__ import annotations

import functools
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from llm_mdp.tasks.base import ResponseBatch, Task
from llm_mdp.tasks.tokenizers import char_tokenizer

LOWER = "abcdefghijklmnopqrstuvwxyz"


def target_token_task(
    target: str = "a",
    alphabet: str = LOWER[:8],
    max_response_tokens: int = 8,
    num_prompts: int = 16,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> Task:
    """Fill the response with ``target``: reward = (#target tokens) / ``max_response_tokens``.

    Dense enough for a tiny model to learn in seconds; the optimum 1.0 is reached by
    emitting the target until the length cap. A uniform policy over ``V`` tokens scores
    far below 0.1.
    """
    if len(target) != 1 or target not in alphabet:
        raise ValueError(f"target {target!r} must be one character of alphabet {alphabet!r}")
    tok = tokenizer or char_tokenizer(alphabet)
    ids = tok(target, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise ValueError(f"target {target!r} is not a single token of {type(tok).__name__}")
    prompts = _random_strings(alphabet, num_prompts, 1, 4, seed=0)
    return Task(
        name="target_token",
        prompts=prompts,
        reward_fn=TargetFraction(int(ids[0]), max_response_tokens),
        tokenizer=tok,
        max_response_tokens=max_response_tokens,
        optimal_reward=1.0,
        description=f"emit {target!r} at every position: reward = fraction of slots that are {target!r}",
    )


def keyword_task(
    keyword: str = "ab",
    alphabet: str = LOWER[:6],
    max_response_tokens: int = 6,
    num_prompts: int = 16,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> Task:
    """Reward 1 if the response text contains ``keyword``, else 0 (a sparse, binary reward)."""
    if not keyword or any(c not in alphabet for c in keyword):
        raise ValueError(f"keyword {keyword!r} must be non-empty text over alphabet {alphabet!r}")
    if len(keyword) > max_response_tokens:
        raise ValueError(
            f"keyword {keyword!r} is longer than max_response_tokens={max_response_tokens}"
        )
    return Task(
        name="keyword",
        prompts=_random_strings(alphabet, num_prompts, 1, 4, seed=1),
        reward_fn=ContainsKeyword(keyword),
        tokenizer=tokenizer or char_tokenizer(alphabet),
        max_response_tokens=max_response_tokens,
        optimal_reward=1.0,
        description=f"binary: does the response contain {keyword!r}?",
    )


def reverse_task(
    alphabet: str = "abcd",
    min_len: int = 1,
    max_len: int = 3,
    partial: bool = False,
    tokenizer: PreTrainedTokenizerBase | None = None,
    max_response_tokens: int | None = None,
) -> Task:
    """Answer ``"abc="`` with ``"cba"``: exact match (1/0), or per-character credit.

    With ``partial=True`` the reward is the fraction of positions of the longer of the
    two strings where response and target agree, so partial answers earn partial credit.
    Prompts: every string of length ``min_len..max_len`` over ``alphabet``.
    """
    prompts = [
        "".join(p) + "="
        for n in range(min_len, max_len + 1)
        for p in itertools.product(alphabet, repeat=n)
    ]
    return Task(
        name="reverse",
        prompts=prompts,
        reward_fn=ReversedPrompt(partial),
        tokenizer=tokenizer or char_tokenizer(alphabet + "="),
        max_response_tokens=max_response_tokens or max_len + 1,
        optimal_reward=1.0,
        description="reverse the string before '='" + (" (partial credit)" if partial else ""),
    )


def arithmetic_task(
    max_operand: int = 4,
    partial: bool = False,
    tokenizer: PreTrainedTokenizerBase | None = None,
    max_response_tokens: int | None = None,
) -> Task:
    """Answer ``"3+4="`` with ``"7"``: exact match on the digits of ``a + b``.

    Prompts: every pair ``0 <= a, b <= max_operand``.
    """
    if not 0 <= max_operand <= 99:
        raise ValueError(f"max_operand={max_operand}, expected 0..99")
    prompts = [f"{a}+{b}=" for a in range(max_operand + 1) for b in range(max_operand + 1)]
    return Task(
        name="arithmetic",
        prompts=prompts,
        reward_fn=SumOfOperands(partial),
        tokenizer=tokenizer or char_tokenizer("0123456789+="),
        max_response_tokens=max_response_tokens or len(str(2 * max_operand)) + 1,
        optimal_reward=1.0,
        description="write the sum a+b in digits",
    )


def hidden_rewards_task(
    alphabet: str = "ab",
    max_response_tokens: int = 4,
    gamma: float = 1.0,
    prompts: tuple[str, ...] = ("a",),
    seed: int = 0,
) -> Task:
    """True token rewards ``r(s_t, w_t) ~ U(-1, 1)``, hidden: the learner sees ``RM(W)``.

    ``RM(W) = sum_t gamma^(t-1) r(s_t, w_t)`` exactly, so Theorem 1 of the paper applies;
    the env reports the token rewards in ``info["token_rewards"]``. Each reward is a
    deterministic function of ``(seed, prompt, prefix, token)``, EOS included. The
    optimal reward is computed by dynamic programming over the response tree (feasible
    for small alphabets and horizons).
    """
    tok = char_tokenizer(alphabet)
    eos = int(tok.eos_token_id)
    chars = [i for i in range(len(tok)) if i != eos]  # the actions that continue a response
    hidden = HiddenTokenRewards(seed, gamma)
    r = hidden.token_reward

    def best(prompt: tuple[int, ...], prefix: tuple[int, ...]) -> float:
        if len(prefix) == max_response_tokens:
            return 0.0
        vals = []
        for w in chars:  # characters continue the response
            vals.append(r(prompt, prefix, w) + gamma * best(prompt, (*prefix, w)))
        vals.append(r(prompt, prefix, eos))  # EOS ends it
        return max(vals)

    optimum = None
    if len(chars) ** max_response_tokens <= 200_000:
        ids = [tuple(tok(p).input_ids) for p in prompts]
        optimum = sum(best(p, ()) for p in ids) / len(ids)

    return Task(
        name="hidden_rewards",
        prompts=list(prompts),
        reward_fn=hidden,
        tokenizer=tok,
        max_response_tokens=max_response_tokens,
        token_reward_fn=hidden.token_rewards,
        gamma=gamma,
        optimal_reward=optimum,
        description="hidden token rewards; RM(W) is their discounted sum (Theorem 1 set-up)",
        metadata={"token_reward": r},
    )


@dataclass(frozen=True)
class TargetFraction:
    """``RM(W)`` of ``target_token``: the number of ``target_id`` tokens over the cap."""

    target_id: int
    max_response_tokens: int

    def __call__(self, batch: ResponseBatch) -> torch.Tensor:
        """``(n,)`` float64 rewards of ``batch``."""
        hits = ((batch.response_ids == self.target_id) & batch.response_mask.bool()).sum(-1)
        return hits.double() / self.max_response_tokens


@dataclass(frozen=True)
class ContainsKeyword:
    """``RM(W)`` of ``keyword``: 1.0 if the response text contains ``keyword``, else 0.0."""

    keyword: str

    def __call__(self, batch: ResponseBatch) -> list[float]:
        """One reward per response of ``batch``."""
        return [float(self.keyword in r) for r in batch.responses]


@dataclass(frozen=True)
class ReversedPrompt:
    """``RM(W)`` of ``reverse``: does the response spell the prompt (before ``=``) backwards?"""

    partial: bool = False

    def __call__(self, batch: ResponseBatch) -> list[float]:
        """One reward per response of ``batch``."""
        pairs = zip(batch.prompts, batch.responses, strict=True)
        return [_match(r, p.rstrip("=")[::-1], self.partial) for p, r in pairs]


@dataclass(frozen=True)
class SumOfOperands:
    """``RM(W)`` of ``arithmetic``: is the response ``a + b`` in digits for prompt ``a+b=``?"""

    partial: bool = False

    def __call__(self, batch: ResponseBatch) -> list[float]:
        """One reward per response of ``batch``."""
        out = []
        for p, r in zip(batch.prompts, batch.responses, strict=True):
            a, b = p.rstrip("=").split("+")
            out.append(_match(r, str(int(a) + int(b)), self.partial))
        return out


class HiddenTokenRewards:
    """The hidden token rewards of ``hidden_rewards`` and their discounted sum ``RM(W)``.

    ``token_reward(prompt, prefix, token)`` is ``U(-1, 1)`` drawn from a generator seeded
    with ``(seed, prompt, prefix, token)``, so it is a fixed function of the state and the
    action and survives pickling (its memo is not pickled, only rebuilt).
    """

    def __init__(self, seed: int, gamma: float) -> None:
        self.seed, self.gamma = seed, gamma
        self._memo: dict[tuple[tuple[int, ...], tuple[int, ...], int], float] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"seed": self.seed, "gamma": self.gamma}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.seed, self.gamma = state["seed"], state["gamma"]
        self._memo = {}

    def token_reward(self, prompt: tuple[int, ...], prefix: tuple[int, ...], token: int) -> float:
        """``r(s_t, w_t)`` for the state ``prompt + prefix`` and the action ``token``."""
        key = (prompt, prefix, token)
        value = self._memo.get(key)
        if value is None:
            rng = random.Random(f"{self.seed}|{prompt}|{prefix}|{token}")
            value = self._memo[key] = rng.uniform(-1.0, 1.0)
        return value

    def token_rewards(self, batch: ResponseBatch) -> torch.Tensor:
        """``(n, R)`` float64: ``r_t`` of every response token of ``batch``, 0 on padding."""
        out = torch.zeros(batch.response_ids.shape, dtype=torch.float64)
        prompt_rows = batch.prompt_ids.tolist()
        prompt_keep = batch.prompt_mask.tolist()
        for i, resp in enumerate(batch.response_token_lists()):
            prompt = tuple(t for t, k in zip(prompt_rows[i], prompt_keep[i], strict=True) if k)
            for t, w in enumerate(resp):
                out[i, t] = self.token_reward(prompt, tuple(resp[:t]), w)
        return out

    def __call__(self, batch: ResponseBatch) -> torch.Tensor:
        """``(n,)`` float64: ``RM(W) = sum_t gamma^(t-1) r_t``."""
        R = batch.response_ids.shape[1]
        discounts = torch.tensor([self.gamma**t for t in range(R)], dtype=torch.float64)
        return (self.token_rewards(batch) * discounts).sum(-1)


def _match(response: str, target: str, partial: bool) -> float:
    if not partial:
        return float(response == target)
    n = max(len(response), len(target))
    return sum(a == b for a, b in zip(response, target, strict=False)) / n if n else 1.0


def _random_strings(alphabet: str, n: int, lo: int, hi: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choices(alphabet, k=rng.randint(lo, hi))) for _ in range(n)]


TASKS: dict[str, Callable[..., Task]] = {
    "target_token": target_token_task,
    "keyword": keyword_task,
    "reverse": reverse_task,
    "arithmetic": arithmetic_task,
    "hidden_rewards": hidden_rewards_task,
}


TASK_FAMILIES: dict[str, Callable[..., Task]] = {}
"""Task families by prefix: ``make_task("rg:chain_sum")`` calls
``TASK_FAMILIES["rg"]("chain_sum")`` (reasoning-gym, GEM, TextArena adapters)."""


def task_factory(name: str) -> Callable[..., Task]:
    """The factory ``make_task(name, **kwargs)`` calls: a registered task's, or for
    ``"prefix:rest"`` its family's with ``rest`` bound as the first argument."""
    if name in TASKS:
        return TASKS[name]
    prefix, sep, rest = name.partition(":")
    if sep and rest and prefix in TASK_FAMILIES:
        return functools.partial(TASK_FAMILIES[prefix], rest)
    families = ", ".join(f"{p}:<name>" for p in sorted(TASK_FAMILIES))
    raise ValueError(
        f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}"
        + (f"; task families: {families}" if families else "")
    )


def make_task(name: str, **kwargs: Any) -> Task:
    """Build a registered task by name, e.g. ``make_task("reverse", partial=True)`` or
    ``make_task("rg:chain_sum", size=32)`` (a task family, :data:`TASK_FAMILIES`)."""
    task = task_factory(name)(**kwargs)
    task.metadata.setdefault("make_task", {"name": name, "kwargs": kwargs})
    return task


def register_task_family(prefix: str, factory: Callable[..., Task]) -> None:
    """Make ``make_task(f"{prefix}:{rest}", **kw)`` build ``factory(rest, **kw)``."""
    if not prefix or ":" in prefix:
        raise ValueError(f"task family prefix {prefix!r}: expected a non-empty name without ':'")
    if prefix in TASK_FAMILIES:
        raise ValueError(f"task family {prefix!r} is already registered")
    TASK_FAMILIES[prefix] = factory


def register_task(name: str, factory: Callable[..., Task]) -> None:
    """Make ``make_task(name)`` (and the CLI's ``--task name``) build ``factory()``, and
    register its Gymnasium id ``llm_mdp/<Name>-v0``."""
    if name in TASKS:
        raise ValueError(f"task {name!r} is already registered")
    TASKS[name] = factory
    from llm_mdp.envs.registration import register_env

    register_env(name)
