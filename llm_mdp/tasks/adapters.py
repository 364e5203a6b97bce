"""Tasks from the LLM-environment ecosystem: reasoning-gym, GEM, TextArena.

* :func:`reasoning_gym_task`: any `reasoning-gym <https://pypi.org/project/reasoning-gym/>`_
  procedural dataset as a single-turn task; the dataset's own ``score_answer`` is the
  response-level reward ``RM(W)``. ``llm-mdp train --task rg:<dataset>``.
* :func:`text_env_task`: any text environment with ``reset(seed) -> observation`` and
  ``step(text) -> (reply, reward, done)`` as a multi-turn task (:mod:`llm_mdp.tasks.turns`):
  the prompt pool is a list of seeds, each policy turn is one ``step``, the env's reply
  is appended as non-action tokens, and the reward is the sum of the env's step rewards.
  :func:`gem_task` (``--task gem:<id>``) and :func:`textarena_task` (``--task ta:<id>``)
  are thin wrappers for GEM's (PyPI ``gem-llm``) and TextArena's single-player games.

The packages are optional extras (``pip install llm-mdp[reasoning-gym]``, ``[gem]``,
``[textarena]``), imported only when a task is built; all three generate their data
locally, so nothing is downloaded at run time.

The reply protocol asks for replies that are functions of the conversation, while these
environments are stateful objects. :class:`TextEnvGame` bridges the two: it replays the
policy's turns on a fresh env from the prompt's seed, and caches the outcome of every
history (and keeps the live env of recent ones, so that a rollout steps each env once).
"""

from __future__ import annotations

import string
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from transformers import PreTrainedTokenizerBase

from llm_mdp.tasks.base import ResponseBatch, Task
from llm_mdp.tasks.multiturn import policy_turns, response_policy_mask
from llm_mdp.tasks.tokenizers import char_tokenizer
from llm_mdp.tasks.turns import Turn

__all__ = [
    "GemEnv",
    "ReasoningGymScore",
    "TextArenaEnv",
    "TextEnv",
    "TextEnvGame",
    "gem_task",
    "reasoning_gym_task",
    "text_env_task",
    "textarena_task",
]

TEXT_ALPHABET = string.ascii_letters + string.digits + string.punctuation + " \n"
"""Characters of the default tokenizer of the text-environment tasks."""


def _require(module: str, extra: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(
            f"this task needs the optional package {module!r}: pip install 'llm-mdp[{extra}]'"
        ) from None


# ---------------------------------------------------------------------------------------
# reasoning-gym


def reasoning_gym_task(
    dataset: str,
    size: int = 64,
    seed: int = 0,
    max_response_tokens: int | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    **config: Any,
) -> Task:
    """A reasoning-gym dataset as a task: its questions, scored by its ``score_answer``.

    Args:
        dataset: a name from ``reasoning_gym.factory.DATASETS`` (e.g. ``"chain_sum"``).
        size: how many questions to generate.
        seed: the generator's seed.
        max_response_tokens: default: the longest reference answer plus EOS.
        tokenizer: default: one character per symbol of the questions and answers (and
            every digit), so a tiny model can play; else a pretrained model's tokenizer.
        config: the dataset's own options (e.g. ``min_terms=2, max_terms=2``).

    ``optimal_reward`` is the mean score of the reference answers (1.0 for the usual
    exact-match scorers).
    """
    ds = _reasoning_gym_dataset(dataset, size, seed, config)
    entries = list(ds)
    questions = [str(e["question"]) for e in entries]
    answers = [str(e["answer"]) for e in entries]
    symbols = set("".join(questions + answers)) | set(string.digits)
    tok = tokenizer or char_tokenizer("".join(sorted(symbols)))
    answer_len = max(len(tok.encode(a, add_special_tokens=False)) for a in answers) + 1
    reward = ReasoningGymScore(dataset, size, seed, dict(config))
    optimum = sum(float(ds.score_answer(a, e)) for a, e in zip(answers, entries, strict=True))
    return Task(
        name=f"rg:{dataset}",
        prompts=questions,
        reward_fn=reward,
        tokenizer=tok,
        max_response_tokens=max_response_tokens or answer_len,
        optimal_reward=optimum / len(entries),
        description=f"reasoning-gym {dataset!r} ({size} questions, seed {seed})",
        metadata={"reasoning_gym": {"dataset": dataset, "size": size, "seed": seed, **config}},
    )


def _reasoning_gym_dataset(name: str, size: int, seed: int, config: dict[str, Any]) -> Any:
    rg = _require("reasoning_gym", "reasoning-gym")
    try:
        return rg.create_dataset(name, size=size, seed=seed, **config)
    except (KeyError, ValueError) as exc:
        known = ", ".join(sorted(rg.factory.DATASETS))
        raise ValueError(
            f"reasoning-gym dataset {name!r}: {exc}; known datasets: {known}"
        ) from None


class ReasoningGymScore:
    """``RM(W)`` of a reasoning-gym task: ``score_answer(response, entry)`` of the prompt's
    entry; 0 where the scorer raises (some do on an answer they cannot parse, e.g.
    ``prime_factorization`` on letters). Pickles as its arguments; the dataset is
    regenerated on first use."""

    def __init__(self, dataset: str, size: int, seed: int, config: dict[str, Any]) -> None:
        self.dataset, self.size, self.seed, self.config = dataset, size, seed, config
        self._ds: Any = None
        self._by_question: dict[str, int] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "size": self.size,
            "seed": self.seed,
            "config": self.config,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]

    def _entry(self, index: int, question: str) -> dict[str, Any]:
        if self._ds is None:
            self._ds = _reasoning_gym_dataset(self.dataset, self.size, self.seed, self.config)
            self._by_question = {str(e["question"]): i for i, e in enumerate(self._ds)}
        if index < 0:
            if question not in self._by_question:
                raise ValueError(
                    f"reasoning-gym {self.dataset!r}: the free-text prompt {question[:80]!r} is "
                    "none of the dataset's questions, so there is no entry to score against"
                )
            index = self._by_question[question]
        return dict(self._ds[index])

    def __call__(self, batch: ResponseBatch) -> list[float]:
        """One score in ``[0, 1]`` per response of ``batch``."""
        indices = batch.prompt_indices.tolist()
        out = []
        for i, response in enumerate(batch.responses):
            entry = self._entry(int(indices[i]), batch.prompts[i])
            try:
                score = float(self._ds.score_answer(response, entry))
            except Exception:  # some scorers raise on an answer they cannot parse
                score = 0.0
            out.append(score)
        return out


# ---------------------------------------------------------------------------------------
# text environments


class TextEnv(Protocol):
    """A text environment: ``reset(seed)`` gives the first observation, ``step(text)``
    plays one turn and gives ``(reply, reward, done)``."""

    def reset(self, seed: int) -> str: ...

    def step(self, text: str) -> tuple[str, float, bool]: ...


@dataclass(frozen=True)
class _Outcome:
    reply: str
    total_reward: float
    done: bool


@dataclass
class TextEnvGame:
    """``reply_fn`` and ``reward_fn`` of a text-environment task.

    The outcome of a history (the policy's turn texts after the prompt of seed
    ``seeds[i]``) is computed once: from the live env of its parent history when one is
    kept, else by replaying the history on ``make_env()`` reset with the seed.

    Args:
        make_env: builds a fresh :class:`TextEnv` (must pickle for subprocess envs).
        seeds: the seed of each prompt of the pool.
        tokenizer: encodes the env's replies.
        max_turns: the task's turn cap (the reward steps the last turn itself).
        reply_template: how a reply is written into the conversation (``{}``: the reply).
        max_cached: outcomes kept; ``max_live``: live envs kept.
    """

    make_env: Callable[[], TextEnv]
    seeds: Sequence[int]
    tokenizer: PreTrainedTokenizerBase
    max_turns: int | None = None
    reply_template: str = "\n{}\n"
    max_cached: int = 100_000
    max_live: int = 256
    _outcomes: OrderedDict[tuple[int, tuple[str, ...]], _Outcome] = field(
        default_factory=OrderedDict, init=False, repr=False
    )
    _live: OrderedDict[tuple[int, tuple[str, ...]], TextEnv] = field(
        default_factory=OrderedDict, init=False, repr=False
    )

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_outcomes"], state["_live"] = OrderedDict(), OrderedDict()
        return state

    def first_observation(self, index: int) -> str:
        """The observation ``reset(seeds[index])`` gives: prompt ``index``'s text."""
        return self.make_env().reset(int(self.seeds[index]))

    def outcome(self, index: int, history: tuple[str, ...]) -> _Outcome:
        """The env's reply, summed reward and ``done`` after the turns ``history``."""
        if index < 0:
            raise ValueError(
                "a text-environment task plays the env of a seed from its pool; a free-text "
                "prompt (prompt_index=-1) has none: reset with prompt_indices instead"
            )
        key = (index, history)
        if key in self._outcomes:
            self._outcomes.move_to_end(key)
            return self._outcomes[key]
        before = self.outcome(index, history[:-1]) if len(history) > 1 else None
        if before is not None and before.done:
            raise ValueError(f"turn {len(history)} comes after the env ended the episode")
        env = self._live.pop((index, history[:-1]), None)
        if env is None:
            env = self.make_env()
            env.reset(int(self.seeds[index]))
            for text in history[:-1]:
                env.step(text)
        reply, reward, done = env.step(history[-1])
        total = (before.total_reward if before is not None else 0.0) + float(reward)
        out = self._outcomes[key] = _Outcome(str(reply), total, bool(done))
        if not done:
            self._live[key] = env
            while len(self._live) > self.max_live:
                self._live.popitem(last=False)
        while len(self._outcomes) > self.max_cached:
            self._outcomes.popitem(last=False)
        return out

    def _history(self, ids: Sequence[int], mask: Sequence[bool]) -> tuple[str, ...]:
        eos = int(self.tokenizer.eos_token_id)
        return tuple(str(self.tokenizer.decode(t)) for t in policy_turns(ids, mask, eos))

    def __call__(self, turn: Turn) -> list[int] | None:
        """``reply_fn``: the env's reply to the turn that just ended, None when done."""
        out = self.outcome(turn.prompt_index, self._history(turn.response_ids, turn.policy_mask))
        if out.done:
            return None
        ids = encode_text(self.tokenizer, self.reply_template.format(out.reply))
        if not ids:
            raise ValueError(f"the env replied {out.reply!r}, which has no token to append")
        return ids

    def reward(self, batch: ResponseBatch) -> list[float]:
        """``reward_fn``: the env's step rewards summed over each response's turns."""
        indices = batch.prompt_indices.tolist()
        out = []
        for i, ids in enumerate(batch.response_token_lists()):
            history = self._history(ids, response_policy_mask(batch, i, ids, self, self.max_turns))
            out.append(self.outcome(int(indices[i]), history).total_reward if history else 0.0)
        return out


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of ``text``; characters a character tokenizer lacks are dropped."""
    try:
        return list(tokenizer.encode(text, add_special_tokens=False))
    except Exception:
        vocab = tokenizer.get_vocab()
        kept = "".join(c for c in text if c in vocab)
        return list(tokenizer.encode(kept, add_special_tokens=False))


def text_env_task(
    make_env: Callable[[], TextEnv],
    seeds: Sequence[int] = tuple(range(16)),
    *,
    name: str = "text_env",
    tokenizer: PreTrainedTokenizerBase | None = None,
    max_turns: int | None = None,
    max_response_tokens: int = 64,
    reply_template: str = "\n{}\n",
    description: str = "",
) -> Task:
    """Any text environment as a multi-turn task.

    Prompt ``i`` is the observation ``make_env().reset(seeds[i])`` (characters the
    tokenizer lacks dropped); every policy turn (the text up to its EOS) is one
    ``step``; the reply is appended as non-action tokens until the env says ``done``
    or ``max_turns`` turns are played. ``RM(W)`` is the sum of the step rewards, so the
    reward comes at the end (arXiv 2506.02553 eq. (4)). Replies are written as
    ``reply_template.format(reply)`` (on a line of their own by default). Default
    tokenizer: characters of printable ASCII and newline (:data:`TEXT_ALPHABET`).
    """
    tok = tokenizer or char_tokenizer(TEXT_ALPHABET)
    game = TextEnvGame(make_env, list(seeds), tok, max_turns, reply_template)
    prompts = [
        str(tok.decode(encode_text(tok, game.first_observation(i)))) for i in range(len(seeds))
    ]
    return Task(
        name=name,
        prompts=prompts,
        reward_fn=game.reward,
        tokenizer=tok,
        max_response_tokens=max_response_tokens,
        description=description or f"text environment {name!r} over {len(seeds)} seeds",
        reply_fn=game,
        max_turns=max_turns,
    )


@dataclass(frozen=True)
class GemEnv:
    """A GEM environment (``gem.make(env_id, **kwargs)``) with the :class:`TextEnv` shape;
    calling it builds a fresh one (so it is a picklable ``make_env``)."""

    env_id: str
    kwargs: tuple[tuple[str, Any], ...] = ()

    def __call__(self) -> TextEnv:
        return _GemEnvInstance(self.env_id, self.kwargs)


class _GemEnvInstance:
    def __init__(self, env_id: str, kwargs: tuple[tuple[str, Any], ...]) -> None:
        gem = _require("gem", "gem")
        self.env = gem.make(env_id, **dict(kwargs))

    def reset(self, seed: int) -> str:
        obs, _ = self.env.reset(seed=seed)
        return str(obs)

    def step(self, text: str) -> tuple[str, float, bool]:
        obs, reward, terminated, truncated, _ = self.env.step(text)
        return str(obs), float(reward), bool(terminated or truncated)


def gem_task(env_id: str, seeds: Sequence[int] = tuple(range(16)), **kwargs: Any) -> Task:
    """A GEM game (``gem.make(env_id)``) as a multi-turn task.

    E.g. ``env_id="game:GuessTheNumber-v0-easy"``; ``kwargs`` go to :func:`text_env_task`.
    ``RM(W)`` is the sum of the game's step rewards."""
    return text_env_task(GemEnv(env_id), seeds, name=f"gem:{env_id}", **kwargs)


@dataclass(frozen=True)
class TextArenaEnv:
    """A TextArena single-player game (``ta.make(env_id)``) with the :class:`TextEnv`
    shape; calling it builds a fresh one. The reply is what the game appended to the
    player's observation after the move (the echo of the move left out); the reward is
    the game's reward for player 0 when it ends."""

    env_id: str

    def __call__(self) -> TextEnv:
        return _TextArenaInstance(self.env_id)


class _TextArenaInstance:
    def __init__(self, env_id: str) -> None:
        ta = _require("textarena", "textarena")
        self.env = ta.make(env_id)
        self.seen = ""

    def reset(self, seed: int) -> str:
        self.env.reset(num_players=1, seed=seed)
        _, self.seen = self.env.get_observation()
        return str(self.seen)

    def step(self, text: str) -> tuple[str, float, bool]:
        done, _ = self.env.step(text)
        if done:
            rewards, _ = self.env.close()
            return "", float(rewards[0]), True
        _, obs = self.env.get_observation()
        obs = str(obs)
        new = obs[len(self.seen) :] if obs.startswith(self.seen) else obs
        self.seen = obs
        echo = f"[Player] {text}"
        lines = [ln for ln in new.split("\n") if ln.strip() and ln.strip() != echo]
        return "\n".join(lines), 0.0, False


def textarena_task(env_id: str, seeds: Sequence[int] = tuple(range(16)), **kwargs: Any) -> Task:
    """A TextArena single-player game (``ta.make(env_id)``) as a multi-turn task.

    E.g. ``env_id="GuessTheNumber-v0"``; ``kwargs`` go to :func:`text_env_task`.
    ``RM(W)`` is the game's final reward for the player."""
    return text_env_task(TextArenaEnv(env_id), seeds, name=f"ta:{env_id}", **kwargs)
