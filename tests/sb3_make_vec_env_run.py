"""PPO on stable-baselines3's own ``make_vec_env("llm_mdp/TargetToken-v0")``.

Run as a script (``python tests/sb3_make_vec_env_run.py subproc``) it prints the result of
training over ``SubprocVecEnv`` as JSON; :mod:`tests.test_tooling` imports :func:`train`
to run the same over ``DummyVecEnv`` in-process and compares. The module imports
``llm_mdp`` at the top, as a user's script does: ``SubprocVecEnv``'s workers start from
a fresh interpreter that re-imports the main script's imports, which registers the ids.
"""

from __future__ import annotations

import functools
import json
import sys
from typing import Any

import torch
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

import llm_mdp  # noqa: F401  (registers the Gymnasium ids)
from llm_mdp.policies import tiny_gpt2
from llm_mdp.sb3 import LMActorCriticPolicy
from llm_mdp.tasks import make_task


def train(vec_env_cls: Any, steps: int = 64) -> tuple[PPO, list[torch.Tensor]]:
    """PPO with a 1-layer GPT-2 policy on 2 envs for ``steps`` steps; returns the model and
    its parameters before training."""
    venv = make_vec_env("llm_mdp/TargetToken-v0", n_envs=2, seed=0, vec_env_cls=vec_env_cls)
    vocab = make_task("target_token").vocab_size
    factory = functools.partial(tiny_gpt2, vocab, n_layer=1, n_embd=32, seed=0)
    model = PPO(
        LMActorCriticPolicy,
        venv,
        n_steps=16,
        batch_size=16,
        n_epochs=1,
        seed=0,
        policy_kwargs={"model": factory},
    )
    before = [p.detach().clone() for p in model.policy.parameters()]
    model.learn(steps)
    return model, before


def summary(model: PPO) -> dict[str, Any]:
    """What two runs must agree on: steps, episode rewards, every weight."""
    flat = torch.cat([p.detach().flatten() for p in model.policy.parameters()])
    return {
        "steps": model.num_timesteps,
        "rewards": [float(e["r"]) for e in model.ep_info_buffer],
        "params": flat.double().tolist(),
    }


if __name__ == "__main__":  # SB3's rule for SubprocVecEnv scripts
    torch.set_num_threads(1)
    cls = {"subproc": SubprocVecEnv, "dummy": DummyVecEnv}[sys.argv[1]]
    trained, _ = train(cls)
    print(json.dumps(summary(trained)))
    trained.get_env().close()
