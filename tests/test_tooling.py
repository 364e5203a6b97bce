"""Standard tooling runs the token env unmodified, and the package imports light.

* ``import llm_mdp`` registers every id without importing torch or transformers;
* every registered id runs under Gymnasium's own ``make_vec`` (``sync``, ``async``) with
  fixed-shape infos, and rewards equal the task's reward of the final observation;
* an ordinary Gymnasium loop over the native ``gymnasium.make_vec`` default autoresets,
  while the built-in agents insist on their own (``Disabled``, torch) mode;
* stable-baselines3's own ``make_vec_env`` (``DummyVecEnv`` and ``SubprocVecEnv``,
  ``render_mode="rgb_array"``) trains;
* built-in tasks and the envs holding them pickle and give the same rewards after.
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch

from llm_mdp.envs import LLMTokenEnv, LLMTokenVectorEnv, env_id
from llm_mdp.envs.registration import BUILTIN_TASKS
from llm_mdp.envs.token_env import FRAME_SHAPE
from llm_mdp.tasks import TASKS, ResponseBatch, Task, make_task, register_task

ROOT = Path(__file__).resolve().parents[1]


def _run_python(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, check=True
    )
    return out.stdout


# ---------------------------------------------------------------- a light import
def test_import_llm_mdp_registers_ids_without_torch_or_transformers() -> None:
    code = (
        "import sys, gymnasium as gym\n"
        "import llm_mdp\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
        "print(sorted(k for k in gym.registry if k.startswith('llm_mdp/')))\n"
        "env = llm_mdp.LLMTokenEnv('reverse')  # the lazy attribute imports on first use\n"
        "print('transformers' in sys.modules, env.action_space.n)\n"
    )
    heavy, ids, after = _run_python(code).strip().splitlines()
    assert heavy == "[]"
    assert ids == str(sorted(env_id(t) for t in BUILTIN_TASKS))
    assert after == f"True {make_task('reverse').vocab_size}"


def test_builtin_names_are_the_task_registry_and_new_tasks_get_an_id() -> None:
    assert tuple(TASKS)[: len(BUILTIN_TASKS)] == BUILTIN_TASKS
    name = "tooling_test_task"
    factory = functools.partial(make_task, "target_token", max_response_tokens=3)
    register_task(name, factory)
    try:
        env = gym.make(env_id(name))
        assert env.unwrapped.task.max_response_tokens == 3  # type: ignore[attr-defined]
    finally:
        del TASKS[name]
        gym.registry.pop(env_id(name))


# ---------------------------------------------------------------- Gymnasium's vector envs
def _task_of(vec: Any) -> Task:
    inner = vec.envs[0] if hasattr(vec, "envs") else None
    if inner is not None:
        return inner.unwrapped.task
    if isinstance(vec, LLMTokenVectorEnv):
        return vec.task
    return make_task(vec.spec.kwargs["task"], **vec.spec.kwargs.get("task_kwargs", {}))


def _prompt_indices(vec: Any) -> torch.Tensor:
    """Each row's index into the prompt pool (guess_number's reward depends on it, not
    only on the prompt text); -1 where the vector env does not expose it (async)."""
    if isinstance(vec, LLMTokenVectorEnv):
        return torch.as_tensor(vec.prompt_index).cpu()
    if hasattr(vec, "envs"):
        return torch.tensor([int(e.unwrapped._vec.prompt_index[0]) for e in vec.envs])
    return torch.full((vec.num_envs,), -1)


def _random_episodes(vec: Any, steps: int, P: int, seed: int = 0) -> tuple[int, list[Any]]:
    """Step ``vec`` (NEXT_STEP autoreset, NumPy) with random actions; check on every step
    that a row that ends is paid the task's reward of its final observation and nothing
    before; returns the number of finished episodes and the infos of the ending steps."""
    task = _task_of(vec)
    vec.action_space.seed(seed)
    obs, _ = vec.reset(seed=seed)
    finished, infos = 0, []
    restarting = np.zeros(vec.num_envs, dtype=bool)
    for _ in range(steps):
        obs, reward, term, trunc, info = vec.step(vec.action_space.sample())
        assert isinstance(reward, np.ndarray) and reward.shape == (vec.num_envs,)
        ended = term | trunc
        ids = torch.as_tensor(obs["input_ids"])
        mask = torch.as_tensor(obs["attention_mask"])
        assert not bool(mask[restarting, P:].any())  # NEXT_STEP: the row restarted
        if ended.any():
            rows = torch.as_tensor(np.flatnonzero(ended))
            batch = ResponseBatch(
                prompt_ids=ids[rows, :P],
                prompt_mask=mask[rows, :P],
                response_ids=ids[rows, P:],
                response_mask=mask[rows, P:],
                prompt_indices=_prompt_indices(vec)[rows],
                tokenizer=task.tokenizer,
            )
            np.testing.assert_allclose(reward[ended], task.score(batch).numpy(), rtol=0, atol=1e-6)
            finished += int(ended.sum())
            infos.append((ended, info))
        assert not reward[~ended].any()
        restarting = ended
    return finished, infos


@pytest.mark.parametrize("task", BUILTIN_TASKS)
def test_every_registered_id_runs_under_sync_make_vec(task: str) -> None:
    vec = gym.make_vec(env_id(task), num_envs=3, vectorization_mode="sync")
    P, R = vec.envs[0].unwrapped.P, vec.envs[0].unwrapped.R  # type: ignore[attr-defined]
    finished, infos = _random_episodes(vec, 4 * R, P)
    assert finished >= 3
    for ended, info in infos:
        np.testing.assert_array_equal(info["_response"], ended)
        assert info["response"].shape == (3,)
    vec.close()


@pytest.mark.parametrize(
    "mode", ["sync", pytest.param("async", marks=pytest.mark.slow), "vector_entry_point"]
)
def test_hidden_rewards_under_make_vec_runs_1000_random_steps(mode: str) -> None:
    gamma, R = 0.9, 4
    vec = gym.make_vec(
        env_id("hidden_rewards"),
        num_envs=3,
        vectorization_mode=mode,
        task_kwargs={"gamma": gamma, "max_response_tokens": R},
    )
    finished, infos = _random_episodes(vec, 1000, P=1)
    assert finished > 500  # episodes of 1..4 tokens
    discounts = gamma ** np.arange(R)
    for ended, info in infos:  # fixed shapes, and RM(W) = sum_t gamma^(t-1) r_t
        assert info["token_rewards"].shape == (3, R)
        np.testing.assert_array_equal(info["_token_rewards"], ended)
    # the rewards paid equal the discounted token rewards reported with them
    vec.reset(seed=1)
    vec.action_space.seed(1)
    for _ in range(200):
        _, reward, term, trunc, info = vec.step(vec.action_space.sample())
        ended = term | trunc
        if ended.any():
            expected = (info["token_rewards"][ended] * discounts).sum(-1)
            np.testing.assert_allclose(reward[ended], expected, rtol=0, atol=1e-6)
    vec.close()


def test_plain_gymnasium_loop_over_native_make_vec_runs_many_episodes() -> None:
    env = gym.make_vec("llm_mdp/Reverse-v0", num_envs=4)
    assert isinstance(env, LLMTokenVectorEnv) and env.backend == "numpy"
    assert env.metadata["autoreset_mode"] == gym.vector.AutoresetMode.NEXT_STEP
    episodes = np.zeros(4, dtype=int)
    finished, _ = _random_episodes(env, 100, env.P)  # no EnvStateError after the first
    obs, _ = env.reset(seed=0)
    for _ in range(100):  # the loop as Gymnasium's docs write it
        obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
        episodes += terminated | truncated
    assert finished > 4 * 4 and (episodes >= 4).all()
    env.close()


def test_agents_state_their_autoreset_mode() -> None:
    from llm_mdp.agents import GRPO, GRPOConfig
    from llm_mdp.policies import CausalLMPolicy, tiny_gpt2

    env = gym.make_vec("llm_mdp/TargetToken-v0", num_envs=4)
    policy = CausalLMPolicy(tiny_gpt2(env.vocab_size, seed=0), env.tokenizer)  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="autoreset_mode='NextStep', backend='numpy'"):
        GRPO(env, policy, GRPOConfig(group_size=4))  # type: ignore[arg-type]
    ours = gym.make_vec(
        "llm_mdp/TargetToken-v0", num_envs=4, autoreset_mode="Disabled", backend="torch"
    )
    agent = GRPO(ours, policy, GRPOConfig(group_size=4, seed=0))  # type: ignore[arg-type]
    m = agent.train_step()
    assert m["update"] == 1 and 0.0 <= m["reward/mean"] <= 1.0


# ---------------------------------------------------------------- stable-baselines3
def test_sb3_make_vec_env_dummy_trains_and_renders() -> None:
    pytest.importorskip("stable_baselines3")
    from stable_baselines3.common.vec_env import DummyVecEnv

    from tests.sb3_make_vec_env_run import train

    model, before = train(DummyVecEnv)
    assert model.num_timesteps == 64
    after = list(model.policy.parameters())
    assert any(not torch.equal(b, a) for b, a in zip(before, after, strict=True))
    assert model.ep_info_buffer is not None
    episodes = list(model.ep_info_buffer)  # SB3's Monitor, one per env
    assert len(episodes) >= 64 // 8 and all(1 <= e["l"] <= 8 for e in episodes)
    assert all(0.0 <= e["r"] <= e["l"] / 8 for e in episodes)  # target fraction of 8 slots
    venv = model.get_env()
    assert venv is not None
    frame = venv.render()  # make_vec_env asks for render_mode="rgb_array"
    assert (
        frame is not None
        and frame.shape == (2 * FRAME_SHAPE[0], FRAME_SHAPE[1], 3)
        and frame.min() < 128
    )


@pytest.mark.slow
def test_sb3_make_vec_env_subproc_trains_like_dummy() -> None:
    """A user's script: ``make_vec_env("llm_mdp/TargetToken-v0", vec_env_cls=SubprocVecEnv)``
    trains exactly as with ``DummyVecEnv`` (same seed: same episodes, same weights)."""
    pytest.importorskip("stable_baselines3")
    from stable_baselines3.common.vec_env import DummyVecEnv

    from tests.sb3_make_vec_env_run import summary, train

    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    script = ROOT / "tests" / "sb3_make_vec_env_run.py"
    proc = subprocess.run(
        [sys.executable, str(script), "subproc"], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    subproc = json.loads(proc.stdout.strip().splitlines()[-1])
    dummy = summary(train(DummyVecEnv)[0])
    assert subproc["steps"] == dummy["steps"] == 64
    assert subproc["rewards"] == dummy["rewards"] and len(dummy["rewards"]) >= 8
    assert subproc["params"] == dummy["params"]


def test_rgb_array_frames() -> None:
    env = LLMTokenEnv("reverse", render_mode="rgb_array")
    env.reset(seed=0, options={"prompt": "ab="})
    first = env.render()
    env.step(env.tokenizer.convert_tokens_to_ids("b"))
    second = env.render()
    assert isinstance(first, np.ndarray) and isinstance(second, np.ndarray)
    assert first.shape == second.shape == FRAME_SHAPE and first.dtype == np.uint8
    assert first.min() < 128 and not np.array_equal(first, second)  # text drawn, and it moved


# ---------------------------------------------------------------- pickling
@pytest.mark.parametrize("task", BUILTIN_TASKS)
def test_builtin_task_envs_pickle_and_give_the_same_rewards(task: str) -> None:
    env = LLMTokenEnv(task)
    n = len(env.tokenizer)
    rng = np.random.default_rng(0)
    env.reset(seed=0)
    env.step((env.tokenizer.eos_token_id + 1) % n)  # a token that is not EOS: mid-episode
    copy = pickle.loads(pickle.dumps(env))
    episodes = 0
    for _ in range(3 * env.R):
        a = int(rng.integers(0, n))
        obs, r, term, trunc, info = env.step(a)
        obs2, r2, term2, trunc2, info2 = copy.step(a)
        assert (r2, term2, trunc2) == (r, term, trunc)
        for k in obs:
            np.testing.assert_array_equal(obs2[k], obs[k])
        assert info2.keys() == info.keys()
        if term or trunc:
            episodes += 1
            seed = int(rng.integers(1 << 30))
            for e in (env, copy):
                e.reset(seed=seed)
    assert episodes >= 2

    vec = LLMTokenVectorEnv(task, 4, autoreset_mode="SameStep")
    vec.reset(seed=3)
    vcopy = pickle.loads(pickle.dumps(vec))
    for _ in range(2 * env.R):
        actions = torch.as_tensor(rng.integers(0, vec.vocab_size, size=4))
        _, r, *_ = vec.step(actions)
        _, r2, *_ = vcopy.step(actions)
        torch.testing.assert_close(r2, r, rtol=0, atol=0)


# ---------------------------------------------------------------- the verify table
@pytest.fixture(scope="module")
def small_report() -> Any:
    from llm_mdp.theory import verify

    return verify(horizon=2, rollouts=(1,), anchors=(1,))


@pytest.mark.parametrize("width", [80, 100, None])
def test_verify_table_fits_the_width_and_keeps_every_cell(small_report: Any, width: Any) -> None:
    import io

    from llm_mdp.theory import format_report, print_report
    from llm_mdp.theory.display import _tables

    _, tables = _tables(small_report)
    cells = {c for _, head, body in tables for row in [head, *body] for c in row}
    plain = format_report(small_report, width)
    stream = io.StringIO()
    print_report(small_report, stream, width=width)
    rich = stream.getvalue()
    for text in (plain, rich):
        lines = text.splitlines()
        if width is not None:
            assert max(len(line) for line in lines) <= width
        for cell in cells:  # nothing cut or ellipsized: every cell is on one line, whole
            assert any(cell in line for line in lines), cell
    assert ("(1/" in plain) == (width is not None)
    natural = max(len(line) for line in format_report(small_report).splitlines()[1:])
    assert natural > 100  # so that the widths above do cut the tables


# ---------------------------------------------------------------- bench output
def test_bench_quiet_nests_and_silences_model_loading(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    from transformers.utils import logging as tlog

    from llm_mdp.bench.common import quiet
    from llm_mdp.bench.vs_trl import load_model
    from llm_mdp.policies import tiny_gpt2

    assert tlog.is_progress_bar_enabled()
    tiny_gpt2(10, n_layer=1, n_embd=16, seed=0).save_pretrained(tmp_path)
    capfd.readouterr()
    with quiet():
        with quiet():  # a section's own quiet() inside run_bench's
            pass
        assert not tlog.is_progress_bar_enabled()
        load_model(tmp_path, torch.device("cpu"))
    out, err = capfd.readouterr()
    assert "Loading weights" not in err + out
    assert tlog.is_progress_bar_enabled()  # restored on the way out


def test_progress_bar_names_the_agent(capfd: pytest.CaptureFixture[str]) -> None:
    from llm_mdp.agents import REINFORCE, REINFORCEConfig
    from llm_mdp.policies import CausalLMPolicy, tiny_gpt2

    env = LLMTokenVectorEnv("target_token", 4)
    policy = CausalLMPolicy(tiny_gpt2(env.vocab_size, n_layer=1, n_embd=16, seed=0), env.tokenizer)
    agent = REINFORCE(env, policy, REINFORCEConfig(seed=0))
    capfd.readouterr()
    agent.learn(2, progress=True)
    err = capfd.readouterr().err.replace("\r", "\n")
    bars = [line for line in err.splitlines() if "update" in line]
    assert bars and all(line.startswith("reinforce: ") for line in bars)
    assert "2/2" in bars[-1]
