"""stable-baselines3 and Gymnasium tooling on the token env (``llm_mdp.sb3``).

* the optional dependency stays optional;
* the single env passes SB3's and Gymnasium's checkers, and Gymnasium's episode-statistics
  wrappers record the right episodes;
* ``LLMVecEnv`` reproduces the native env and SB3's own ``DummyVecEnv`` step for step;
* ``LMActorCriticPolicy`` computes the LM's true next-token distribution, never one-hot
  encodes anything (checked at a 50257-token vocabulary), runs under PPO and A2C, saves
  and loads, and PPO learns with it (and with SB3's ``MultiInputPolicy``).
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch

pytest.importorskip("stable_baselines3")

from gymnasium.utils.env_checker import check_env as gym_check_env
from gymnasium.wrappers import RecordEpisodeStatistics
from gymnasium.wrappers.vector import RecordEpisodeStatistics as VectorRecordEpisodeStatistics
from stable_baselines3 import A2C, PPO
from stable_baselines3.common.env_checker import check_env as sb3_check_env
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.vec_env import DummyVecEnv, VecMonitor
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from llm_mdp.envs import LLMTokenEnv, LLMTokenVectorEnv, env_id
from llm_mdp.policies import tiny_gpt2, tiny_llama
from llm_mdp.sb3 import LLMVecEnv, LMActorCriticPolicy, make_sb3_env
from llm_mdp.tasks import ResponseBatch, Task, make_task

ROOT = Path(__file__).resolve().parents[1]
TOK = make_task("target_token").tokenizer
V = len(TOK)  # the target_token vocabulary (every id an action)
EOS = int(TOK.eos_token_id)
CHAR = int(TOK.convert_tokens_to_ids("a"))  # a token that continues a response


def _random_actions(seed: int, steps: int, num_envs: int, vocab: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(steps, num_envs))


def _n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------- optional dependency
def test_llm_mdp_imports_without_sb3_and_sb3_module_says_how_to_install() -> None:
    code = (
        "import sys\n"
        "sys.modules['stable_baselines3'] = None  # as if not installed\n"
        "import llm_mdp\n"
        "import llm_mdp.envs, llm_mdp.tasks, llm_mdp.policies\n"
        "try:\n"
        "    import llm_mdp.sb3\n"
        "except ImportError as exc:\n"
        "    print('IMPORT-ERROR:', exc)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, check=True
    )
    assert "IMPORT-ERROR:" in out.stdout
    assert "pip install 'llm-mdp[sb3]'" in out.stdout


# ---------------------------------------------------------------- checkers
@pytest.mark.filterwarnings("ignore:.*alternative render modes")
@pytest.mark.parametrize("length_cap", ["terminated", "truncated"])
@pytest.mark.parametrize("task", ["target_token", "hidden_rewards"])
def test_single_env_passes_sb3_and_gymnasium_checkers(task: str, length_cap: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # SB3's checker reports problems as warnings
        sb3_check_env(LLMTokenEnv(task, length_cap=length_cap), warn=True)  # type: ignore[arg-type]
    gym_check_env(LLMTokenEnv(task, length_cap=length_cap))
    gym_check_env(gym.make(env_id(task), length_cap=length_cap).unwrapped)


# ---------------------------------------------------------------- Gymnasium episode statistics
def test_record_episode_statistics_on_single_env() -> None:
    env = RecordEpisodeStatistics(gym.make(env_id("target_token")))
    env.action_space.seed(0)
    env.reset(seed=0)
    ret, length, seen = 0.0, 0, []
    while len(seen) < 20:
        _, r, term, trunc, info = env.step(env.action_space.sample())
        ret, length = ret + float(r), length + 1
        if term or trunc:
            assert info["episode"]["r"] == pytest.approx(ret)
            assert info["episode"]["l"] == length
            seen.append((ret, length))
            ret, length = 0.0, 0
            env.reset()
    assert [float(r) for r in env.return_queue] == pytest.approx([s[0] for s in seen])
    assert list(env.length_queue) == [s[1] for s in seen]


def _native_episodes(mode: str, actions: np.ndarray) -> list[tuple[float, int]]:
    """Episodes (return, length) of the numpy vector env, tracked by hand."""
    env = LLMTokenVectorEnv("target_token", actions.shape[1], backend="numpy", autoreset_mode=mode)
    env.reset(seed=0)
    ret = np.zeros(env.num_envs)
    length = np.zeros(env.num_envs, dtype=int)
    restart = np.zeros(env.num_envs, dtype=bool)  # NextStep: this step only resets the row
    out = []
    for a in actions:
        _, r, term, trunc, _ = env.step(a)
        ret[restart], length[restart] = 0.0, 0
        ret[~restart] += r[~restart]
        length[~restart] += 1
        done = term | trunc
        out += [(float(ret[i]), int(length[i])) for i in np.flatnonzero(done)]
        if mode == "SameStep":
            ret[done], length[done] = 0.0, 0
        else:
            restart = done
    return out


@pytest.mark.parametrize("mode", ["SameStep", "NextStep"])
def test_vector_record_episode_statistics_numpy_backend(mode: str) -> None:
    actions = _random_actions(1, 60, 4, make_task("target_token").vocab_size)
    expected = _native_episodes(mode, actions)
    env = VectorRecordEpisodeStatistics(
        gym.make_vec(env_id("target_token"), num_envs=4, backend="numpy", autoreset_mode=mode),
        buffer_length=1000,
    )
    env.reset(seed=0)
    for a in actions:
        env.step(a)
    got = list(zip(map(float, env.return_queue), map(int, env.length_queue), strict=True))
    assert len(got) > 10
    assert got == expected
    if mode == "SameStep":  # SB3's VecMonitor on the adapter sees the same episodes
        sb3_env = VecMonitor(LLMVecEnv("target_token", 4))
        sb3_env.seed(0)
        sb3_env.reset()
        episodes = []
        for a in actions:
            *_, infos = sb3_env.step(a)
            episodes += [
                (info["episode"]["r"], info["episode"]["l"]) for info in infos if "episode" in info
            ]
        assert episodes == [(round(r, 6), n) for r, n in expected]  # VecMonitor rounds to 6


def test_vector_record_episode_statistics_disabled_mode() -> None:
    env = VectorRecordEpisodeStatistics(
        gym.make_vec(env_id("target_token"), num_envs=4, backend="numpy", autoreset_mode="Disabled")
    )
    env.reset(seed=0)
    env.action_space.seed(0)
    while not env.unwrapped.all_done:  # type: ignore[attr-defined]
        env.step(env.action_space.sample())
    assert env.episode_count == 4
    assert min(env.length_queue) >= 1


# ---------------------------------------------------------------- the VecEnv adapter
def test_adapter_equals_native_vector_env() -> None:
    """Same seed and actions: identical obs, rewards, dones, terminal observations and
    time-limit flags (length_cap='truncated' so the cap is a time limit)."""
    n, steps = 4, 60
    kw: dict[str, Any] = {"length_cap": "truncated"}
    native = LLMTokenVectorEnv(
        "target_token", n, backend="numpy", autoreset_mode="SameStep", info_text=False, **kw
    )
    adapter = LLMVecEnv("target_token", n, **kw)
    adapter.seed(123)
    obs = adapter.reset()
    nobs, _ = native.reset(seed=123)
    for k in nobs:
        np.testing.assert_array_equal(obs[k], nobs[k])
    ends = {"eos": 0, "cap": 0}
    for a in _random_actions(2, steps, n, native.vocab_size):
        obs, rew, dones, infos = adapter.step(a)
        nobs, nrew, term, trunc, ninfo = native.step(a)
        assert rew.dtype == np.float32 and dones.dtype == bool and len(infos) == n
        np.testing.assert_allclose(rew, nrew, rtol=0, atol=1e-7)
        np.testing.assert_array_equal(dones, term | trunc)
        for k in nobs:
            np.testing.assert_array_equal(obs[k], nobs[k])
        for i in range(n):
            assert infos[i]["TimeLimit.truncated"] == bool(trunc[i] and not term[i])
            assert ("terminal_observation" in infos[i]) == bool(dones[i])
            if dones[i]:
                for k in nobs:
                    np.testing.assert_array_equal(
                        infos[i]["terminal_observation"][k], ninfo["final_obs"][k][i]
                    )
                ends["cap" if trunc[i] else "eos"] += 1
    assert ends["eos"] > 3 and ends["cap"] > 3  # both kinds of ending were exercised


@pytest.mark.parametrize("task", ["target_token", "hidden_rewards"])
def test_adapter_equals_sb3_dummy_vec_env_of_single_envs(task: str) -> None:
    """SB3's reference ``DummyVecEnv`` over ``LLMTokenEnv``s (one prompt, so nothing random
    but the actions) and the batched adapter agree step for step, autoresets included."""
    kw: dict[str, Any] = {"length_cap": "truncated"}
    if task == "target_token":
        kw["task_kwargs"] = {"num_prompts": 1, "max_response_tokens": 5}
    n = 3
    ref = DummyVecEnv([lambda: LLMTokenEnv(task, **kw) for _ in range(n)])
    adapter = LLMVecEnv(task, n, **kw)
    obs, ref_obs = adapter.reset(), ref.reset()
    for k in ref_obs:
        np.testing.assert_array_equal(obs[k], ref_obs[k])
    vocab = adapter.get_attr("vocab_size")[0]
    n_done = 0
    for a in _random_actions(3, 40, n, vocab):
        obs, rew, dones, infos = adapter.step(a)
        ref_obs, ref_rew, ref_dones, ref_infos = ref.step(a)
        np.testing.assert_allclose(rew, ref_rew, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(dones, ref_dones)
        for k in ref_obs:
            np.testing.assert_array_equal(obs[k], ref_obs[k])
        for info, ref_info in zip(infos, ref_infos, strict=True):
            assert info["TimeLimit.truncated"] == ref_info["TimeLimit.truncated"]
            assert info.keys() - {"token_rewards"} <= ref_info.keys()
            if "terminal_observation" in ref_info:
                n_done += 1
                for k in ref_obs:
                    np.testing.assert_array_equal(
                        info["terminal_observation"][k], ref_info["terminal_observation"][k]
                    )
            if "token_rewards" in ref_info:
                np.testing.assert_allclose(info["token_rewards"], ref_info["token_rewards"])
    assert n_done > 5


def test_adapter_decodes_no_text() -> None:
    adapter = LLMVecEnv("target_token", 4)
    tok = adapter.venv.tokenizer

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the SB3 path decoded text")

    tok.decode = boom  # type: ignore[method-assign]
    tok.batch_decode = boom  # type: ignore[method-assign]
    adapter.reset()
    dones = 0
    for a in _random_actions(0, 30, 4, V):
        dones += int(adapter.step(a)[2].sum())
    assert dones > 0


def test_adapter_construction_attributes_seeding_and_options() -> None:
    # every way in: task name, registered id, Task, an existing SameStep env (either backend)
    task = make_task("target_token")
    for env in (
        LLMVecEnv("target_token", 2),
        LLMVecEnv(env_id("target_token"), 2),
        LLMVecEnv(task, 2),
        LLMVecEnv(LLMTokenVectorEnv(task, 2, autoreset_mode="SameStep", info_text=False)),
    ):
        assert env.num_envs == 2 and env.observation_space == env.venv.single_observation_space
        env.reset()
        obs, rew, dones, _ = env.step(np.array([EOS, EOS]))
        assert isinstance(obs["input_ids"], np.ndarray) and isinstance(rew, np.ndarray)
        assert dones.all()  # EOS
    with pytest.raises(ValueError, match="SameStep"):
        LLMVecEnv(LLMTokenVectorEnv(task, 2))
    with pytest.raises(ValueError, match="autoreset_mode"):
        LLMVecEnv("target_token", 2, autoreset_mode="NextStep")
    with pytest.raises(ValueError, match="num_envs"):
        LLMVecEnv(LLMTokenVectorEnv(task, 2, autoreset_mode="SameStep"), 3)
    with pytest.warns(UserWarning, match="info_text"):
        LLMVecEnv(LLMTokenVectorEnv(task, 2, autoreset_mode="SameStep"))

    env = LLMVecEnv("target_token", 3)
    assert env.get_attr("P") == [env.venv.P] * 3
    assert env.get_attr("vocab_size", indices=[0, 2]) == [V, V]
    assert env.env_is_wrapped(gym.Wrapper) == [False] * 3
    env.set_attr("info_text", False)
    with pytest.raises(ValueError, match="share"):
        env.set_attr("info_text", True, indices=[1])
    env.reset()
    texts = env.env_method("render_text")
    assert len(texts) == 3 and texts[0].count("\n") == 2

    # seeding: the next reset only, the same seed gives the same prompts
    env.seed(7)
    first = env.reset()["input_ids"]
    assert env.seed(7) == [7, 7, 7]
    np.testing.assert_array_equal(env.reset()["input_ids"], first)

    # per-env reset options, in LLMTokenEnv's names
    env.set_options([{"prompt_index": i, "response_prefix": [CHAR] * i} for i in range(3)])
    obs = env.reset()
    P = env.venv.P
    np.testing.assert_array_equal(obs["attention_mask"][:, P:].sum(1), [0, 1, 2])
    np.testing.assert_array_equal(obs["input_ids"][:, :P], env.venv._pool_ids[:3].numpy())
    env.set_options({"prompt": "ab"})
    assert env.reset()["attention_mask"][:, :P].sum(1).tolist() == [2, 2, 2]
    env.set_options([{"prompt": "a"}, {}, {}])
    with pytest.raises(ValueError, match="same option keys"):
        env.reset()
    env.close()


def test_torch_backend_env_gives_numpy_to_sb3() -> None:
    native = LLMTokenVectorEnv("target_token", 3, autoreset_mode="SameStep", info_text=False)
    env = LLMVecEnv(native)
    env.reset()
    for a in _random_actions(0, 12, 3, V):
        obs, rew, dones, infos = env.step(a)
        assert all(isinstance(v, np.ndarray) for v in obs.values())
        assert isinstance(rew, np.ndarray) and isinstance(dones, np.ndarray)
        for info in infos:
            if "terminal_observation" in info:
                assert isinstance(info["terminal_observation"]["input_ids"], np.ndarray)


# ---------------------------------------------------------------- the LM policy
def _policy(env: LLMVecEnv, model: Any, **kw: Any) -> LMActorCriticPolicy:
    return LMActorCriticPolicy(
        env.observation_space, env.action_space, lambda _: 1e-3, model=model, **kw
    )


@pytest.mark.parametrize("factory", [tiny_gpt2, tiny_llama])
def test_lm_policy_is_the_lm_next_token_distribution(factory: Any) -> None:
    """Logits and values equal an unpadded forward of each row alone (checks the
    left-compaction and position ids; RoPE and learned positions), for integer and for
    float (rollout-buffer) observations."""
    env = LLMVecEnv("target_token", 6)
    env.seed(0)
    obs = env.reset()
    for a in _random_actions(5, 3, 6, V):  # some rows mid-response, some just reset
        obs, *_ = env.step(a)
    lm = factory(V, seed=1)
    policy = _policy(env, lm)
    torch.nn.init.normal_(policy.value_net.weight)
    obs_t, _ = policy.obs_to_tensor(obs)
    assert isinstance(obs_t, dict)
    with torch.no_grad():
        dist = policy.get_distribution(obs_t)
        values = policy.predict_values(obs_t)
        float_obs = {k: v.float() for k, v in obs_t.items()}
        values_f, logp_f, _ = policy.evaluate_actions(float_obs, torch.arange(6))
        for i in range(6):
            keep = obs["attention_mask"][i].astype(bool)
            ids = torch.as_tensor(obs["input_ids"][i][keep]).unsqueeze(0)
            out = lm(input_ids=ids, output_hidden_states=True)
            expected = torch.log_softmax(out.logits[0, -1], -1)
            torch.testing.assert_close(dist.distribution.logits[i], expected, atol=1e-5, rtol=1e-5)
            assert logp_f[i] == pytest.approx(float(expected[i]), abs=1e-5)
            v = policy.value_net(out.hidden_states[-1][0, -1])
            assert float(values[i]) == pytest.approx(float(v), abs=1e-5)
            assert float(values_f[i]) == pytest.approx(float(v), abs=1e-5)


def test_lm_policy_parameters_and_errors() -> None:
    env = LLMVecEnv("target_token", 2)
    lm = tiny_gpt2(16, n_layer=1, n_embd=32)  # LM head larger than the vocabulary: cut to V
    policy = _policy(env, lm)
    assert _n_params(policy) == _n_params(lm) + 32 + 1
    obs_t, _ = policy.obs_to_tensor(env.reset())
    assert policy.get_distribution(obs_t).distribution.logits.shape == (2, V)
    separate = _policy(
        env, functools.partial(tiny_gpt2, V, n_layer=1, n_embd=32), share_features_extractor=False
    )
    assert _n_params(separate) == 2 * _n_params(tiny_gpt2(V, n_layer=1, n_embd=32)) + 33
    with pytest.raises(TypeError, match="policy_kwargs"):
        _policy(env, None)
    with pytest.raises(TypeError, match="net_arch"):
        _policy(env, lm, net_arch=[64])
    with pytest.raises(ValueError, match="LM head has 8 rows"):
        _policy(env, tiny_gpt2(8, n_layer=1, n_embd=32))
    with pytest.raises(ValueError, match="observation space"):
        LMActorCriticPolicy(gym.spaces.Box(0, 1, (4,)), env.action_space, lambda _: 1e-3, model=lm)


def test_a2c_separate_critic_and_ppo_save_load(tmp_path: Path) -> None:
    env = make_sb3_env("target_token", 4)
    factory = functools.partial(tiny_gpt2, V, n_layer=1, n_embd=32, seed=0)
    a2c = A2C(
        LMActorCriticPolicy,
        env,
        n_steps=8,
        seed=0,
        policy_kwargs={"model": factory, "share_features_extractor": False},
    )
    assert isinstance(a2c.policy.optimizer, torch.optim.RMSprop)
    before = [p.detach().clone() for p in a2c.policy.value_model.parameters()]  # type: ignore[union-attr]
    a2c.learn(64)
    after = list(a2c.policy.value_model.parameters())  # type: ignore[union-attr]
    assert any(not torch.equal(b, a) for b, a in zip(before, after, strict=True))

    # save / load, with a factory and with a model instance (SB3 pickles policy_kwargs:
    # the policy must not leave the LM unpicklable, e.g. with transformers' output hooks)
    for spec in (factory, factory()):
        ppo = PPO(
            LMActorCriticPolicy,
            env,
            n_steps=16,
            batch_size=32,
            n_epochs=1,
            seed=0,
            policy_kwargs={"model": spec},
        )
        ppo.learn(64)
        ppo.save(tmp_path / "ppo")
        loaded = PPO.load(tmp_path / "ppo", env=env)
        obs = env.reset()
        for a, b in zip(
            ppo.policy.state_dict().values(), loaded.policy.state_dict().values(), strict=True
        ):
            torch.testing.assert_close(a, b)
        np.testing.assert_array_equal(
            ppo.predict(obs, deterministic=True)[0], loaded.predict(obs, deterministic=True)[0]
        )


@pytest.mark.parametrize("share", [True, False])
def test_update_log_probs_and_values_equal_the_rollout(share: bool) -> None:
    """What PPO's update recomputes from the rollout buffer (float observations, other
    batch composition, other compaction width) equals what the rollout stored, so the
    first-epoch ratio is 1. GPT-2's learned absolute positions make wrong position ids show
    (RoPE is shift-invariant, so Llama would not)."""
    env = make_sb3_env("target_token", 8)
    factory = functools.partial(tiny_gpt2, V, n_layer=1, n_embd=32, seed=0)
    ppo = PPO(
        LMActorCriticPolicy,
        env,
        n_steps=16,
        seed=0,
        policy_kwargs={"model": factory, "share_features_extractor": share},
    )
    torch.nn.init.normal_(ppo.policy.value_net.weight)
    _, callback = ppo._setup_learn(128, None)
    ppo.collect_rollouts(ppo.env, callback, ppo.rollout_buffer, n_rollout_steps=ppo.n_steps)
    ppo.policy.set_training_mode(True)
    with torch.no_grad():
        for data in ppo.rollout_buffer.get(batch_size=37):
            values, logp, entropy = ppo.policy.evaluate_actions(
                data.observations, data.actions.long().flatten()
            )
            torch.testing.assert_close(logp, data.old_log_prob, atol=1e-5, rtol=0)
            torch.testing.assert_close(values.flatten(), data.old_values, atol=1e-5, rtol=0)
            assert entropy is not None and bool((entropy > 0).all())


def _wordlevel_task(vocab_size: int, target: int, length: int) -> Task:
    vocab = {"<pad>": 0, "<eos>": 1, **{f"t{i}": i for i in range(2, vocab_size)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token=None))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>")

    def reward(batch: ResponseBatch) -> torch.Tensor:
        hits = ((batch.response_ids == target) & batch.response_mask.bool()).sum(-1)
        return hits.double() / length

    prompts = ["t5 t7", "t100 t20000 t3", "t50256"]
    return Task(
        name="wide", prompts=prompts, reward_fn=reward, tokenizer=tok, max_response_tokens=length
    )


def test_gpt2_sized_vocabulary_without_one_hot() -> None:
    """V = 50257: PPO builds and runs a few hundred steps; no layer other than the LM's own
    embedding / head is vocabulary-wide, and the observation reaches the LM as ids."""
    BIG = 50257
    task = _wordlevel_task(BIG, target=50000, length=4)
    assert task.vocab_size == BIG
    env = make_sb3_env(task, 4)
    lm = tiny_gpt2(BIG, n_layer=1, n_embd=16, n_head=2, seed=0)
    n_lm = _n_params(lm)
    model = PPO(
        LMActorCriticPolicy,
        env,
        n_steps=64,
        batch_size=64,
        n_epochs=1,
        seed=0,
        policy_kwargs={"model": lm},
    )
    policy = model.policy
    assert _n_params(policy) == n_lm + 16 + 1
    wide = [name for name, p in policy.named_parameters() if BIG in p.shape]
    assert all(name.startswith("model.") for name in wide)
    W = env.observation_space["input_ids"].shape[0]  # type: ignore[index]
    assert model.rollout_buffer.observations["input_ids"].shape == (64, 4, W)  # type: ignore[attr-defined]
    obs_t, _ = policy.obs_to_tensor(env.reset())
    features = policy.extract_features(obs_t)
    assert features.dtype == torch.long and features.shape == (4, 2, W)
    model.learn(256)
    assert model.num_timesteps == 256


# ---------------------------------------------------------------- learning (fixed seeds)
def _stochastic_return(model: Any, env: Any, n: int = 200) -> float:
    mean, _ = evaluate_policy(model, env, n_eval_episodes=n, deterministic=False)
    return float(mean)


@pytest.mark.slow
def test_ppo_mlp_policy_learns_target_token() -> None:
    env = make_sb3_env("target_token", 8)  # random ~0.07, optimum 1.0
    model = PPO(
        "MultiInputPolicy", env, n_steps=32, batch_size=64, n_epochs=4, learning_rate=1e-3, seed=0
    )
    before = _stochastic_return(model, env)
    model.learn(4096)
    after = _stochastic_return(model, env)
    assert before < 0.2
    assert after > 0.8


@pytest.mark.slow
def test_ppo_lm_policy_learns_target_token() -> None:
    env = make_sb3_env("target_token", 8)
    factory = functools.partial(tiny_gpt2, V, n_layer=2, n_embd=64, seed=0)
    model = PPO(
        LMActorCriticPolicy,
        env,
        n_steps=32,
        batch_size=64,
        n_epochs=4,
        learning_rate=1e-3,
        seed=0,
        policy_kwargs={"model": factory},
    )
    before = _stochastic_return(model, env)
    model.learn(4096)
    after = _stochastic_return(model, env)
    assert before < 0.2
    assert after > 0.8


@pytest.mark.slow
def test_ppo_lm_policy_learns_reverse_which_needs_the_prompt() -> None:
    """``reverse`` (partial credit) can only be solved by reading the prompt, so this also
    checks that the LM sees the observation correctly."""
    env = make_sb3_env("reverse", 16, task_kwargs={"partial": True})  # random ~0.11
    factory = functools.partial(tiny_gpt2, 7, n_layer=2, n_embd=64, seed=0)
    model = PPO(
        LMActorCriticPolicy,
        env,
        n_steps=32,
        batch_size=128,
        n_epochs=4,
        learning_rate=1e-3,
        ent_coef=0.0,
        seed=0,
        policy_kwargs={"model": factory},
    )
    before = _stochastic_return(model, env, 400)
    model.learn(20_000)
    after = _stochastic_return(model, env, 400)
    assert before < 0.2
    assert after > 0.6


def test_lm_policy_masks_the_tokens_that_are_not_actions() -> None:
    """With a pretrained-style tokenizer (a ``<pad>`` and an ``<unk>`` besides EOS), SB3's
    PPO runs unmodified: the policy gives the env's illegal tokens probability 0."""
    from llm_mdp.tasks import illegal_action_ids

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, "a": 3, "b": 4}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(" ", behavior="removed")
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    task = Task.from_text_fn(
        "ab", ["a", "b"], lambda p, r: [float(x == "ab") for x in r], tok, max_response_tokens=3
    )
    env = LLMVecEnv(task, 8)
    illegal = illegal_action_ids(tok)
    assert illegal == [0, 2]
    model = PPO(
        LMActorCriticPolicy,
        env,
        n_steps=16,
        batch_size=32,
        n_epochs=1,
        seed=0,
        device="cpu",
        policy_kwargs={"model": tiny_gpt2(len(tok), seed=0), "illegal_actions": illegal},
    )
    model.learn(64)  # the env would raise on an illegal action
    obs_t, _ = model.policy.obs_to_tensor(env.reset())
    probs = model.policy.get_distribution(obs_t).distribution.probs.detach()
    assert float(probs[:, illegal].max()) == 0.0
    with pytest.raises(ValueError, match="illegal_actions"):
        _policy(env, tiny_gpt2(len(tok)), illegal_actions=[0, 1, 2, 3, 4])
