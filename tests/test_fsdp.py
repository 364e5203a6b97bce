"""FSDP2 on gloo (CPU), world size 2: one update equals one process on the whole batch,
each rank holds half the parameter and optimizer bytes, and a sharded checkpoint written
at world size 2 resumes at world sizes 1 and 2 as if never interrupted."""

from __future__ import annotations

import csv
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

from llm_mdp import fsdp
from llm_mdp.agents import Agent, get_agent
from llm_mdp.envs import LLMTokenVectorEnv
from llm_mdp.policies import CausalLMPolicy, tiny_gpt2

GLOBAL_BATCH = 8
AGENTS = ("grpo", "ppo", "trepo")
LR = 1e-3  # small, so that Adam's first step cannot amplify float noise past 1e-5


def env_and_policy(num_envs: int) -> tuple[LLMTokenVectorEnv, CausalLMPolicy]:
    env = LLMTokenVectorEnv("target_token", num_envs)
    return env, CausalLMPolicy(tiny_gpt2(env.vocab_size, seed=0), env.tokenizer)


def make(name: str, num_envs: int, run_dir: Any = None, **cfg: Any) -> Agent:
    """Agent ``name`` (PPO: policy, critic and reference; GRPO: policy and reference)."""
    cls = get_agent(name)
    group = 4 if name != "ppo" else 1  # one group of 4 per rank at world size 2
    config = cls.config_class(seed=0, learning_rate=LR, group_size=group, **cfg)
    return cls(*env_and_policy(num_envs), config, run_dir=run_dir)


def _full(t: torch.Tensor) -> torch.Tensor:
    full = getattr(t, "full_tensor", None)
    return (full() if callable(full) else t).detach()


def flat(agent: Agent) -> torch.Tensor:
    """Every trainable parameter, whole (sharded ones gathered), in one vector."""
    return torch.cat([_full(p).flatten() for m in agent.modules.values() for p in m.parameters()])


def flat_grad(agent: Agent) -> torch.Tensor:
    params = agent.modules["policy"].parameters()
    return torch.cat([_full(p.grad).flatten() for p in params if p.grad is not None])


def _worker(rank: int, world: int, port: int, out: str) -> None:
    init_gloo(rank, world, port)
    try:
        results: dict[str, Any] = {}
        for name in AGENTS:
            agent = make(name, GLOBAL_BATCH // world, parallel="fsdp")
            agent.learn(1, progress=False)
            results[name] = flat(agent)
            results[f"{name}/bytes"] = fsdp.local_state_bytes(agent)
        # bfloat16 compute: float32 shards and Adam state, a close but not equal gradient
        agent = make("grpo", GLOBAL_BATCH // world, parallel="fsdp", mixed_precision=True)
        agent.learn(1, progress=False)
        results["bf16/grad"] = flat_grad(agent)
        results["bf16/dtypes"] = {p.dtype for p in agent.optimizer.param_groups[0]["params"]} | {
            v.dtype for st in agent.optimizer.state.values() for v in st.values() if v.ndim
        }
        # PPO with every model sharded, checkpointed after one update, resumed at world size 2
        agent = make("ppo", GLOBAL_BATCH // world, run_dir=Path(out) / "run", parallel="fsdp")
        agent.learn(1, progress=False)
        resumed = get_agent("ppo").load(
            Path(out) / "run" / "checkpoint", *env_and_policy(GLOBAL_BATCH // world)
        )
        results["resumed/update"] = resumed.update
        resumed.learn(2, progress=False)
        results["resumed"] = flat(resumed)
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp_update_memory_and_sharded_checkpoint(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    grpo_grad = None
    singles = {}
    for name in AGENTS:
        single = singles[name] = make(name, GLOBAL_BATCH)
        single.learn(1, progress=False)
        for res in ranks:
            torch.testing.assert_close(res[name], flat(single), atol=1e-5, rtol=0, msg=name)
        # parameters and AdamW state at rest: half of a data-parallel replica per rank
        dp = fsdp.local_state_bytes(single)
        for kind in ("parameters", "optimizer"):
            per_rank = [res[f"{name}/bytes"][kind] for res in ranks]
            assert sum(per_rank) >= dp[kind], (name, kind)  # nothing is lost (FSDP pads)
            assert max(per_rank) <= 0.51 * dp[kind], (name, kind, per_rank, dp[kind])
        if name == "grpo":
            grpo_grad = flat_grad(single)

    # mixed precision: master weights and Adam moments stay float32; the bfloat16
    # gradient points the same way as the float32 one but is not equal to it
    assert grpo_grad is not None
    bf16 = ranks[0]["bf16/grad"]
    assert ranks[0]["bf16/dtypes"] == {torch.float32}
    cos = torch.nn.functional.cosine_similarity(bf16, grpo_grad, dim=0)
    assert cos > 0.99, float(cos)
    assert (bf16 - grpo_grad).abs().max() > 1e-5

    straight = singles["ppo"]  # the uninterrupted run, one process
    straight.learn(2, progress=False)
    ckpt = tmp_path / "run" / "checkpoint"
    for res in ranks:  # resumed at world size 2
        assert res["resumed/update"] == 1
        torch.testing.assert_close(res["resumed"], flat(straight), atol=1e-5, rtol=0)
    # resumed at world size 1, unsharded: DCP reassembles the shards into whole tensors
    plain = get_agent("ppo").load(ckpt, *env_and_policy(GLOBAL_BATCH), parallel="dp")
    assert plain.update == 1 and plain.config.parallel == "dp"
    plain.learn(2, progress=False)
    torch.testing.assert_close(flat(plain), flat(straight), atol=1e-5, rtol=0)
    # resumed at world size 1, sharded (a process group of one)
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        sharded = get_agent("ppo").load(ckpt, *env_and_policy(GLOBAL_BATCH))
        assert fsdp.is_sharded(sharded.policy) and fsdp.is_sharded(sharded.modules["critic"])
        sharded.learn(2, progress=False)
        torch.testing.assert_close(flat(sharded), flat(straight), atol=1e-5, rtol=0)
    finally:
        dist.destroy_process_group()


def test_fsdp_configuration_errors(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="process group"):
        make("grpo", 4, parallel="fsdp")
    with pytest.raises(ValueError, match="parallel='fsdp'"):
        make("grpo", 4, mixed_precision=True)
    with pytest.raises(ValueError, match="parallel='zero3'"):
        make("grpo", 4, parallel="zero3")
    path = make("grpo", 4).save(tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match="single-file checkpoint"):
        get_agent("grpo").load(path, *env_and_policy(4), parallel="fsdp")


def _torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess[str]:
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [
        str(torchrun), "--nproc-per-node", str(nproc), "--master-port", str(free_port()),
        "-m", "llm_mdp.cli", "train", *args, "--no-progress",
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_torchrun_cli_fsdp_then_resume_at_one(tmp_path: Path) -> None:
    """``torchrun --nproc-per-node 2 -m llm_mdp.cli train --parallel fsdp`` writes a run
    with a sharded checkpoint, which ``torchrun --nproc-per-node 1 ... --resume`` continues."""
    run = tmp_path / "run"
    proc = _torchrun(
        2, "--agent", "grpo", "--task", "target_token", "--updates", "2", "--num-envs", "8",
        "--set", "group_size=4", "--parallel", "fsdp", "--run-dir", str(run),
    )  # fmt: skip
    assert proc.stdout.count("wrote ") == 1  # only rank 0 reports
    assert "8 episodes per update" in proc.stdout and "x 2 process(es)" in proc.stdout
    assert (run / "checkpoint" / fsdp.META_FILE).exists() and not (run / "checkpoint.pt").exists()
    assert len(list((run / "checkpoint").glob("*.distcp"))) == 2  # one shard file per rank

    proc = _torchrun(1, "--resume", str(run), "--updates", "3")
    assert "resuming" in proc.stdout and "at update 2" in proc.stdout
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(float(r["update"])) for r in rows] == [1, 2, 3]
    assert int(float(rows[-1]["samples"])) == 3 * 8
