"""Tasks: prompt sources and response-level rewards (see :mod:`llm_mdp.tasks.base`)."""

from llm_mdp.tasks.adapters import (
    gem_task,
    reasoning_gym_task,
    text_env_task,
    textarena_task,
)
from llm_mdp.tasks.base import (
    ResponseBatch,
    RewardError,
    RewardFn,
    Task,
    TokenRewardFn,
    check_tokenizer,
    illegal_action_ids,
    legal_action_mask,
)
from llm_mdp.tasks.builtin import (
    TASK_FAMILIES,
    TASKS,
    arithmetic_task,
    hidden_rewards_task,
    keyword_task,
    make_task,
    register_task,
    register_task_family,
    reverse_task,
    target_token_task,
    task_factory,
)
from llm_mdp.tasks.chat import chat_keyword_task
from llm_mdp.tasks.multiturn import calculator_task, guess_number_task
from llm_mdp.tasks.reward_model import HFRewardModel
from llm_mdp.tasks.tokenizers import char_tokenizer
from llm_mdp.tasks.turns import ReplyFn, Turn, TurnError, TurnState, normalize_reply, replay_turns

for _name, _factory in (
    ("chat_keyword", chat_keyword_task),
    ("guess_number", guess_number_task),
    ("calculator", calculator_task),
):
    if _name not in TASKS:
        register_task(_name, _factory)
for _prefix, _family in (("rg", reasoning_gym_task), ("gem", gem_task), ("ta", textarena_task)):
    if _prefix not in TASK_FAMILIES:
        register_task_family(_prefix, _family)

__all__ = [
    "TASKS",
    "TASK_FAMILIES",
    "HFRewardModel",
    "ReplyFn",
    "ResponseBatch",
    "RewardError",
    "RewardFn",
    "Task",
    "TokenRewardFn",
    "Turn",
    "TurnError",
    "TurnState",
    "arithmetic_task",
    "calculator_task",
    "char_tokenizer",
    "chat_keyword_task",
    "check_tokenizer",
    "gem_task",
    "guess_number_task",
    "hidden_rewards_task",
    "illegal_action_ids",
    "keyword_task",
    "legal_action_mask",
    "make_task",
    "normalize_reply",
    "reasoning_gym_task",
    "register_task",
    "register_task_family",
    "replay_turns",
    "reverse_task",
    "target_token_task",
    "task_factory",
    "text_env_task",
    "textarena_task",
]
