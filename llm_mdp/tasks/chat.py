"""``chat_keyword``: a task for a real chat model, rewarded from the response text.

Each prompt is a short factual question, formatted with the tokenizer's own chat
template (``apply_chat_template(..., add_generation_prompt=True)``), followed by an
instruction to answer in one short sentence. The reward is in ``[0, 1]`` with partial
credit, so that a group of sampled answers usually differs and a policy gradient moves
it within a few updates::

    RM(W) = w_keyword * [the answer mentions the question's keyword]      (0.5)
          + w_period  * [the answer ended (EOS) and its text ends in "."]  (0.25)
          + w_short   * [the answer ended] * min(1, max_words / #words)    (0.25)

"Ended" means the policy emitted EOS before the length cap; an answer cut off by the cap
earns only the keyword part. Without ``tokenizer=`` the task uses a character tokenizer
over printable ASCII and a one-line ``User: ... Assistant:`` template, so it also runs
with the tiny random models and in the Gymnasium checker; with a pretrained chat model
(``llm-mdp train --task chat_keyword --model model.gguf``) pass that model's tokenizer.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from llm_mdp.tasks.base import ResponseBatch, Task
from llm_mdp.tasks.tokenizers import char_tokenizer

__all__ = [
    "CHAT_QUESTIONS",
    "ChatKeywordReward",
    "ChatScore",
    "chat_keyword_task",
    "format_chat_prompt",
    "plain_chat_tokenizer",
    "score_answer",
]

CHAT_QUESTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("What color is the sky on a clear day?", ("blue",)),
    ("What is the capital of France?", ("paris",)),
    ("What do bees make?", ("honey",)),
    ("What is frozen water called?", ("ice",)),
    ("Which animal says moo?", ("cow", "cows")),
    ("What planet do we live on?", ("earth",)),
    ("How many legs does a spider have?", ("eight", "8")),
    ("What color is a ripe banana?", ("yellow",)),
    ("What is the opposite of hot?", ("cold",)),
    ("How many days are in a week?", ("seven", "7")),
    ("What is the closest star to Earth?", ("sun",)),
    ("What do you call a baby cat?", ("kitten", "kittens")),
)
"""Built-in ``(question, accepted keywords)`` pairs; keywords match case-insensitively as
whole words."""

INSTRUCTION = "Answer in one short sentence."

PLAIN_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
"""One-line template of :func:`plain_chat_tokenizer` (no newlines, no special tokens)."""


@dataclass(frozen=True)
class ChatScore:
    """The parts of one answer's reward (each in ``[0, 1]``) and their weighted sum."""

    keyword: float
    period: float
    short: float
    total: float


def plain_chat_tokenizer() -> PreTrainedTokenizerBase:
    """A character tokenizer over printable ASCII (no newline) with a one-line chat
    template, for running ``chat_keyword`` without a pretrained model."""
    alphabet = string.ascii_letters + string.digits + string.punctuation + " "
    tok = char_tokenizer(alphabet)
    tok.chat_template = PLAIN_CHAT_TEMPLATE
    return tok


def format_chat_prompt(
    tokenizer: PreTrainedTokenizerBase,
    question: str,
    *,
    instruction: str = INSTRUCTION,
    system_prompt: str | None = None,
) -> str:
    """The prompt text for one question: the tokenizer's chat template with the generation
    prompt appended (``User: ... Assistant:`` when the tokenizer has no template).

    ``system_prompt=None`` keeps the template's own default system message, if any.
    """
    content = f"{question} {instruction}".strip()
    messages = [{"role": "user", "content": content}]
    if system_prompt is not None:
        messages.insert(0, {"role": "system", "content": system_prompt})
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return str(text)
    prefix = f"System: {system_prompt} " if system_prompt is not None else ""
    return f"{prefix}User: {content} Assistant:"


def _keyword_pattern(keywords: Sequence[str]) -> re.Pattern[str]:
    if not keywords or any(not k.strip() for k in keywords):
        raise ValueError(f"keywords {list(keywords)!r} must be non-empty strings")
    alternatives = "|".join(re.escape(k.strip()) for k in keywords)
    return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)


def score_answer(
    answer: str,
    keywords: Sequence[str] | re.Pattern[str] | None,
    *,
    ended: bool,
    max_words: int = 12,
    weights: tuple[float, float, float] = (0.5, 0.25, 0.25),
) -> ChatScore:
    """Score one answer text (see the module docstring).

    Args:
        answer: the response text, special tokens removed.
        keywords: accepted keywords (or a compiled pattern); ``None``: no keyword credit.
        ended: whether the response ended with EOS (not cut by the length cap).
        max_words: answers up to this many words get the full ``short`` credit; longer
            ones ``max_words / #words``.
        weights: ``(keyword, period, short)`` weights; they sum to the optimum.
    """
    if keywords is None:
        keyword = 0.0
    else:
        pattern = keywords if isinstance(keywords, re.Pattern) else _keyword_pattern(keywords)
        keyword = float(pattern.search(answer) is not None)
    text = answer.strip()
    n_words = len(text.split())
    period = float(ended and text.endswith("."))
    short = float(ended and n_words > 0) * min(1.0, max_words / max(n_words, 1))
    w_k, w_p, w_s = weights
    return ChatScore(keyword, period, short, w_k * keyword + w_p * period + w_s * short)


@dataclass(frozen=True)
class ChatKeywordReward:
    """``RM(W)`` of ``chat_keyword`` (a module-level callable, so the task pickles).

    Attributes:
        questions: the questions of the prompt pool, in order.
        patterns: the keyword pattern of each question.
        eos_token_id: the id whose emission means the answer ended.
        max_words: word budget of the ``short`` part.
        weights: ``(keyword, period, short)``.
    """

    questions: tuple[str, ...]
    patterns: tuple[re.Pattern[str], ...]
    eos_token_id: int
    max_words: int
    weights: tuple[float, float, float]

    def pattern_for(self, index: int, prompt_text: str) -> re.Pattern[str] | None:
        """The keyword pattern of pool prompt ``index``, or of the first question that a
        free-text prompt (``index < 0``) contains; ``None`` if there is none."""
        if 0 <= index < len(self.patterns):
            return self.patterns[index]
        for q, pat in zip(self.questions, self.patterns, strict=True):
            if q in prompt_text:
                return pat
        return None

    def __call__(self, batch: ResponseBatch) -> torch.Tensor:
        """``(n,)`` float64 rewards of ``batch``."""
        eos = self.eos_token_id
        ended = [bool(ids) and ids[-1] == eos for ids in batch.response_token_lists()]
        indices = batch.prompt_indices.tolist()
        out = []
        for i, (answer, done) in enumerate(zip(batch.responses, ended, strict=True)):
            pat = self.pattern_for(indices[i], batch.prompts[i] if indices[i] < 0 else "")
            score = score_answer(
                answer, pat, ended=done, max_words=self.max_words, weights=self.weights
            )
            out.append(score.total)
        return torch.tensor(out, dtype=torch.float64)


def chat_keyword_task(
    tokenizer: PreTrainedTokenizerBase | None = None,
    *,
    questions: Sequence[tuple[str, Sequence[str]]] | None = None,
    max_response_tokens: int = 24,
    max_words: int = 12,
    instruction: str = INSTRUCTION,
    system_prompt: str | None = None,
    weights: tuple[float, float, float] = (0.5, 0.25, 0.25),
) -> Task:
    """Short factual questions for a chat model; reward = keyword + format + brevity.

    Args:
        tokenizer: the chat model's tokenizer (its chat template formats the prompts and
            its EOS ends an answer). Default: :func:`plain_chat_tokenizer`.
        questions: ``(question, accepted keywords)`` pairs (default
            :data:`CHAT_QUESTIONS`).
        max_response_tokens: length cap of an answer.
        max_words: word budget of the ``short`` part of the reward.
        instruction: appended to every question.
        system_prompt: a system message (``None``: the template's default).
        weights: ``(keyword, period, short)``; non-negative, optimum = their sum.

    A prompt given as free text at reset gets keyword credit when it contains one of the
    task's questions.
    """
    tok = tokenizer if tokenizer is not None else plain_chat_tokenizer()
    pairs = [(q, tuple(k)) for q, k in (questions if questions is not None else CHAT_QUESTIONS)]
    if not pairs:
        raise ValueError("chat_keyword: the question list is empty")
    if len(weights) != 3 or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights={weights!r}: expected three non-negative numbers, not all 0")
    if max_words < 1:
        raise ValueError(f"max_words={max_words}, expected >= 1")
    patterns = [_keyword_pattern(k) for _, k in pairs]
    prompts = [
        format_chat_prompt(tok, q, instruction=instruction, system_prompt=system_prompt)
        for q, _ in pairs
    ]
    w = (float(weights[0]), float(weights[1]), float(weights[2]))
    reward = ChatKeywordReward(
        questions=tuple(q for q, _ in pairs),
        patterns=tuple(patterns),
        eos_token_id=int(tok.eos_token_id),
        max_words=max_words,
        weights=w,
    )
    return Task(
        name="chat_keyword",
        prompts=prompts,
        reward_fn=reward,
        tokenizer=tok,
        max_response_tokens=max_response_tokens,
        optimal_reward=sum(w),
        description=(
            f"chat: answer in one short sentence; reward {w[0]:g} keyword + {w[1]:g} ends "
            f"with '.' + {w[2]:g} at most {max_words} words"
        ),
        metadata={"questions": pairs, "max_words": max_words, "weights": w},
    )
