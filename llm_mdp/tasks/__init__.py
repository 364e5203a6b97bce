"""Tasks: prompt sources and response-level rewards (see :mod:`llm_mdp.tasks.base`)."""

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
    TASKS,
    arithmetic_task,
    hidden_rewards_task,
    keyword_task,
    make_task,
    register_task,
    reverse_task,
    target_token_task,
)
from llm_mdp.tasks.chat import chat_keyword_task
from llm_mdp.tasks.reward_model import HFRewardModel
from llm_mdp.tasks.tokenizers import char_tokenizer
from llm_mdp.tasks.turns import ReplyFn, Turn, TurnError, TurnState, normalize_reply, replay_turns

if "chat_keyword" not in TASKS:
    register_task("chat_keyword", chat_keyword_task)

__all__ = [
    "TASKS",
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
    "char_tokenizer",
    "chat_keyword_task",
    "check_tokenizer",
    "hidden_rewards_task",
    "illegal_action_ids",
    "keyword_task",
    "legal_action_mask",
    "make_task",
    "normalize_reply",
    "register_task",
    "replay_turns",
    "reverse_task",
    "target_token_task",
]
