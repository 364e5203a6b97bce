"""The action set of the token MDP: every token except special tokens other than EOS.

One rule (``llm_mdp.tasks.illegal_action_ids``) for the env, the samplers, ``log_probs``
and the exact toolkit, so no policy can score by emitting a token that the reward's
decoding drops (an invisible no-op that fills the length cap instead of stopping).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from llm_mdp import LLMTokenEnv, LLMTokenVectorEnv
from llm_mdp.agents import GRPO, GRPOConfig
from llm_mdp.policies import CausalLMPolicy, tiny_gpt2
from llm_mdp.tasks import (
    Task,
    char_tokenizer,
    illegal_action_ids,
    legal_action_mask,
    make_task,
)
from llm_mdp.theory import ExactModel


def tokenizer_with_specials() -> PreTrainedTokenizerFast:
    """Pretrained-style: ``<pad>`` and ``<unk>`` are special tokens distinct from EOS."""
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, "a": 3, "b": 4}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("(?m)."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def task_with_specials() -> Task:
    def reward(prompts: list[str], responses: list[str]) -> list[float]:
        return [float(r == "ab") for r in responses]

    return Task.from_text_fn(
        "ab", ["a", "b"], reward, tokenizer_with_specials(), max_response_tokens=3
    )


def test_char_tokenizer_pads_with_eos_so_every_id_is_an_action() -> None:
    tok = char_tokenizer("abc")
    assert tok.pad_token_id == tok.eos_token_id == 0 and len(tok) == 4
    assert illegal_action_ids(tok) == []
    assert bool(legal_action_mask(tok).all())
    for name in ("target_token", "keyword", "reverse", "arithmetic", "hidden_rewards"):
        env = LLMTokenVectorEnv(name, 2)
        assert bool(env.action_mask.all()) and env.single_action_space.n == env.vocab_size


def test_special_tokens_other_than_eos_are_not_actions() -> None:
    tok = tokenizer_with_specials()
    assert illegal_action_ids(tok) == [0, 2]
    assert legal_action_mask(tok).tolist() == [False, True, False, True, True]
    env = LLMTokenVectorEnv(task_with_specials(), 2)
    assert env.action_masks().shape == (2, 5) and env.action_masks()[:, 1].all()
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"action 0 \(row 1\) is '<pad>', a special token"):
        env.step(torch.tensor([3, 0]))
    env.step(torch.tensor([3, 4]))  # still usable
    with pytest.raises(ValueError, match=r"contains token 2 \('<unk>'\)"):
        env.reset(options={"response_prefix": [[3], [2]]})
    # the single env says the same
    single = LLMTokenEnv(task_with_specials())
    single.reset(seed=0)
    with pytest.raises(ValueError, match="'<pad>', a special token"):
        single.step(0)


def test_a_finished_row_may_be_given_any_action() -> None:
    env = LLMTokenVectorEnv(task_with_specials(), 2)
    env.reset(seed=0)
    env.step(torch.tensor([1, 3]))  # row 0 ends with EOS
    env.step(torch.tensor([0, 4]))  # its action is ignored, even an illegal one


def test_policy_never_samples_an_illegal_token_and_log_probs_renormalise() -> None:
    tok = tokenizer_with_specials()
    env = LLMTokenVectorEnv(task_with_specials(), 64)
    model = tiny_gpt2(len(tok), seed=0)
    # a high temperature makes the policy nearly uniform: without the mask, 2 of its 5
    # tokens would be <pad> or <unk>
    policy = CausalLMPolicy(model, tok, seed=0, temperature=20.0)
    assert policy.action_mask.tolist() == [False, True, False, True, True]
    free = CausalLMPolicy(model, seed=0, temperature=20.0)  # no tokenizer: every id an action
    obs, _ = env.reset(seed=0)
    a_free, _, _ = free.act(obs)
    assert bool(torch.isin(a_free, torch.tensor([0, 2])).any())  # the hole, without a mask
    state, seen = None, []
    while not env.all_done:
        a, logp, state = policy.act(obs, state)
        seen.append(a[~env.done])
        assert bool(torch.isfinite(logp[~env.done]).all())
        obs, *_ = env.step(a)
    assert not bool(torch.isin(torch.cat(seen), torch.tensor([0, 2])).any())
    # teacher-forced log-probs are a distribution over the legal actions only
    lp = policy.log_probs(obs["input_ids"], obs["attention_mask"], env.P)
    ids = obs["input_ids"][:, env.P :]
    keep = obs["attention_mask"][:, env.P :].bool()
    total = torch.zeros(ids.shape[0], ids.shape[1])
    for j in range(ids.shape[1]):  # sum of p(t | s_j) over the legal t, position by position
        for t in (1, 3, 4):
            swapped = obs["input_ids"].clone()
            swapped[:, env.P + j] = torch.where(keep[:, j], t, ids[:, j])
            total[:, j] += policy.log_probs(swapped, obs["attention_mask"], env.P)[:, j].exp()
    torch.testing.assert_close(total[keep], torch.ones(int(keep.sum())), atol=1e-5, rtol=0)
    _, ent = policy.log_probs_and_entropy(obs["input_ids"], obs["attention_mask"], env.P)
    assert bool(torch.isfinite(ent).all()) and bool((ent[keep] <= math.log(3) + 1e-5).all())
    assert bool(torch.isfinite(lp).all())


def test_agents_give_a_tokenizer_free_policy_the_env_action_set() -> None:
    tok = tokenizer_with_specials()
    env = LLMTokenVectorEnv(task_with_specials(), 4)
    policy = CausalLMPolicy(tiny_gpt2(len(tok), seed=0))
    assert bool(policy.action_mask.all())
    GRPO(env, policy, GRPOConfig(group_size=2))
    assert policy.action_mask.tolist() == env.action_mask.tolist()


def test_exact_toolkit_uses_the_same_action_set() -> None:
    task = task_with_specials()
    policy = CausalLMPolicy(tiny_gpt2(len(task.tokenizer), seed=0), task.tokenizer)
    m = ExactModel.from_task(policy, task, prompts=["a"])
    assert tuple(m.tree.actions) == (1, 3, 4)
    with pytest.raises(ValueError, match="not legal actions"):
        ExactModel.from_task(policy, task, prompts=["a"], actions=[0, 1, 3])
    # the policy's own probabilities of the legal actions sum to 1: no renormalisation
    assert float(m.log_pi.exp().sum(-1).sub(1).abs().max()) < 1e-5


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"prompt_indices": [1.5]}, r"prompt_indices must be integers, got \[1\.5\]"),
        ({"response_prefix": [[2.5], [1]]}, r"response_prefix of row 0 is \[2\.5\]"),
        ({"response_prefix": "ab"}, r"one list of token ids per reset row"),
        ({"prompts": "ab="}, r"prompts='ab=' is one text, expected a list of 2"),
    ],
)
def test_reset_options_are_checked_not_converted(options: dict, match: str) -> None:
    env = LLMTokenVectorEnv("reverse", 2)
    with pytest.raises((TypeError, ValueError), match=match):
        env.reset(options=options)


def test_single_env_options_are_checked_too() -> None:
    env = LLMTokenEnv("reverse")
    with pytest.raises(TypeError, match=r"prompt_indices must be integers, got \[1\.5\]"):
        env.reset(options={"prompt_index": 1.5})
    with pytest.raises(TypeError, match=r"response_prefix of row 0 is \[2\.5\]"):
        env.reset(options={"response_prefix": [2.5]})
    obs, _ = env.reset(options={"prompt_index": np.int64(2), "response_prefix": [1]})
    assert int(obs["attention_mask"].sum()) > 1


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_max_response_tokens_is_checked(bad: object) -> None:
    with pytest.raises(ValueError, match=rf"max_response_tokens={bad!r}, expected an integer"):
        LLMTokenVectorEnv("reverse", 1, max_response_tokens=bad)  # type: ignore[arg-type]
    assert make_task("reverse").max_response_tokens == LLMTokenVectorEnv("reverse", 1).R
