"""Data parallel on torch.distributed (gloo, CPU): the update does not depend on the
world size, and a checkpoint written at world size 2 resumes at world size 1."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from gloo import free_port, init_gloo

from llm_mdp.agents import Agent, get_agent
from llm_mdp.envs import LLMTokenVectorEnv
from llm_mdp.policies import CausalLMPolicy, tiny_gpt2

GLOBAL_BATCH = 8
AGENTS = ("grpo", "ppo", "trepo")


def make(name: str, num_envs: int, run_dir: Any = None) -> Agent:
    env = LLMTokenVectorEnv("target_token", num_envs)
    policy = CausalLMPolicy(tiny_gpt2(env.vocab_size, seed=0), env.tokenizer)
    cls = get_agent(name)
    # one group of 4 per rank at world size 2; lr small so Adam cannot amplify float noise
    cfg = cls.config_class(seed=0, learning_rate=1e-3, group_size=4 if name != "ppo" else 1)
    return cls(env, policy, cfg, run_dir=run_dir)


def flat(agent: Agent) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for m in agent.modules.values() for p in m.parameters()])


def _worker(rank: int, world: int, port: int, out: str) -> None:
    init_gloo(rank, world, port)
    try:
        results = {}
        for name in AGENTS:
            agent = make(name, GLOBAL_BATCH // world)
            agent.learn(1, progress=False)
            results[name] = flat(agent)
        # a run checkpointed at world size 2 (rank 0 writes), to resume at world size 1
        agent = make("trepo", GLOBAL_BATCH // world, run_dir=Path(out) / "run")
        agent.learn(1, progress=False)
        dist.barrier()
        if rank == 0:
            torch.save(results, Path(out) / "results.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_world_size_two_equals_one_and_resumes_at_one(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    results = torch.load(tmp_path / "results.pt")
    for name in AGENTS:
        single = make(name, GLOBAL_BATCH)
        single.learn(1, progress=False)
        torch.testing.assert_close(results[name], flat(single), atol=1e-5, rtol=0, msg=name)

    straight = make("trepo", GLOBAL_BATCH)
    straight.learn(2, progress=False)
    fresh = make("trepo", GLOBAL_BATCH)
    resumed = type(fresh).load(tmp_path / "run" / "checkpoint.pt", fresh.env, fresh.policy)
    assert resumed.update == 1
    resumed.learn(2, progress=False)
    torch.testing.assert_close(flat(resumed), flat(straight), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_torchrun_cli(tmp_path: Path) -> None:
    """``torchrun --nproc-per-node 2 -m llm_mdp.cli train`` writes one run folder."""
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [
        str(torchrun), "--nproc-per-node", "2", "--master-port", str(free_port()),
        "-m", "llm_mdp.cli", "train", "--agent", "grpo", "--task", "target_token",
        "--updates", "2", "--num-envs", "8", "--set", "group_size=4",
        "--run-dir", str(tmp_path / "run"), "--no-progress",
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote ") == 1  # only rank 0 reports
    assert "8 episodes per update" in proc.stdout and "x 2 process(es)" in proc.stdout
    assert (tmp_path / "run" / "checkpoint.pt").exists()
