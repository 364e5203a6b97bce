"""``llm_mdp.testing`` names tokens with the MDP's own tokenizer (or plain ids without one)."""

from __future__ import annotations

import pytest
import torch

from llm_mdp import estimators as est
from llm_mdp.estimators import AdvantageInputs
from llm_mdp.policies import TabularPolicy
from llm_mdp.tasks import char_tokenizer
from llm_mdp.testing import assert_unbiased
from llm_mdp.theory import ExactModel


def sign_flipped(batch: AdvantageInputs) -> torch.Tensor:
    return -est.reinforce(batch)


def _user_mdp(tokenizer: object = None) -> ExactModel:
    """A user's MDP over ids 0..3 whose EOS is id 3 and whose prompt is id 0."""
    eos, prompt = 3, (0,)
    policy = TabularPolicy(4, eos, 2, [prompt], seed=0)
    return ExactModel.from_functions(
        policy,
        [prompt],
        (eos, 1, 2),
        eos,
        2,
        length_cap="force-eos",
        reward=lambda p, w: float(len(w)) + 0.5 * w.count(1),
        tokenizer=tokenizer,
    )


def test_messages_without_a_tokenizer_use_ids_and_name_eos() -> None:
    mdp = _user_mdp()
    assert mdp.token_name(3) == "EOS" and mdp.token_name(1) == "1"
    with pytest.raises(AssertionError) as info:
        assert_unbiased(sign_flipped, mdp)
    msg = str(info.value)
    assert "logits[0, 3] (state '0' + '', token 'EOS'): exact grad J" in msg
    assert "logits[0, 1] (state '0' + '', token '1'): exact grad J" in msg
    assert "<pad>" not in msg and "<eos>" not in msg and "'b'" not in msg


def test_messages_use_the_mdps_tokenizer() -> None:
    tok = char_tokenizer("xyz")
    eos = int(tok.eos_token_id)
    x, y = tok.convert_tokens_to_ids(["x", "y"])
    policy = TabularPolicy(len(tok), eos, 2, [(x,)], seed=0)
    mdp = ExactModel.from_functions(
        policy,
        [(x,)],
        (eos, x, y),
        eos,
        2,
        length_cap="force-eos",
        reward=lambda p, w: float(w.count(y)) - 0.3 * len(w),
        tokenizer=tok,
    )
    assert mdp.token_name(eos) == tok.eos_token and mdp.text((x, y)) == "xy"
    with pytest.raises(AssertionError) as info:
        assert_unbiased(sign_flipped, mdp)
    assert "(state 'x' + ''" in str(info.value)
