"""The multi-turn reply protocol (llm_mdp.tasks.turns): checking replies, replaying turns."""

from __future__ import annotations

import pytest

from llm_mdp.tasks import Task, Turn, TurnError, char_tokenizer, normalize_reply


@pytest.fixture
def tok():  # type: ignore[no-untyped-def]
    return char_tokenizer("ab")


def test_normalize_reply_forms() -> None:
    assert normalize_reply(None) is None
    assert normalize_reply([3, 4]) == ((1.0, (3, 4)),)
    assert normalize_reply([(0.25, [1]), (0.75, (2, 1))]) == ((0.25, (1,)), (0.75, (2, 1)))
    assert normalize_reply([(0.0, [1]), (1.0, [2])]) == ((1.0, (2,)),)


@pytest.mark.parametrize(
    ("bad", "words"),
    [
        ("ab", "string"),
        ([], "empty"),
        ([(0.5, [1]), (0.4, [2])], "summing to 0.9"),
        ([(1.5, [1])], "probability 1.5"),
        ([(1.0, [])], "non-empty"),
        ([(0.5, [1]), (0.5, [1, 2])], "prefix"),
        (3.0, "float"),
    ],
)
def test_normalize_reply_errors_name_the_value(bad: object, words: str) -> None:
    with pytest.raises(TurnError, match=words):
        normalize_reply(bad)


def _coin_task(tok) -> Task:  # type: ignore[no-untyped-def]
    """After turn 1 the env says 'a' or 'bb' with probability 1/4, 3/4; turn 2 ends."""
    a, b = tok.convert_tokens_to_ids(["a", "b"])

    def reply(turn: Turn):  # type: ignore[no-untyped-def]
        return None if turn.turn >= 2 else [(0.25, [a]), (0.75, [b, b])]

    return Task("coin", ["a"], lambda batch: [0.0] * len(batch), tok, reply_fn=reply)


def test_replay_marks_injected_tokens_and_multiplies_chance(tok) -> None:  # type: ignore[no-untyped-def]
    task = _coin_task(tok)
    eos = tok.eos_token_id
    a, b = tok.convert_tokens_to_ids(["a", "b"])
    st = task.replay(0, [a], [a, eos, b, b, a, eos])
    assert st.policy_mask == (True, True, False, False, True, True)
    assert (st.turns, st.probability, st.ended, st.pending) == (2, 0.75, True, ())
    mid = task.replay(0, [a], [a, eos, b])  # stops inside the env's reply
    assert (mid.pending, mid.probability, mid.ended) == ((b,), 0.75, False)
    cut = task.replay(0, [a], [a, eos])  # the length cap cut it before the reply's draw
    assert (cut.policy_mask, cut.pending, cut.ended) == ((True, True), (), False)
    assert cut.undecided == ((0.25, (a,)), (0.75, (b, b)))
    with pytest.raises(TurnError, match="none of the environment's replies"):
        task.replay(0, [a], [a, eos, eos])
    with pytest.raises(TurnError, match="after the episode ended"):
        task.replay(0, [a], [eos, a, eos, a])


def test_turn_text_segments(tok) -> None:  # type: ignore[no-untyped-def]
    eos = tok.eos_token_id
    a, b = tok.convert_tokens_to_ids(["a", "b"])
    t = Turn(0, (a,), (a, b, eos, b, a, eos), (True, True, True, False, False, True), 2, tok)
    assert t.segments == [("policy", "ab"), ("env", "ba"), ("policy", "")]
    assert t.encode("ba") == [b, a]


def test_single_turn_task_replays_as_all_policy(tok) -> None:  # type: ignore[no-untyped-def]
    task = Task("one", ["a"], lambda batch: [0.0] * len(batch), tok)
    assert not task.multi_turn
    assert task.replay(0, [1], [1, 2]).policy_mask == (True, True)
    with pytest.raises(ValueError, match="max_turns=0"):
        Task("x", ["a"], lambda batch: [0.0] * len(batch), tok, max_turns=0)
