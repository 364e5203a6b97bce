"""SmolLM2-135M-Instruct rows: rollout vs ``generate``, TRePO vs GRPO, GRPO vs TRL, memory.

``python -m llm_mdp.bench.smollm2 [--out FILE]`` (needs the offline model,
:data:`llm_mdp.models.SMOLLM2_INSTALL`). Not a section of ``llm-mdp bench``: at 135M
parameters one update takes seconds to minutes on a CPU. On the model's chat task
(``chat_keyword``, vocabulary 49152):

* rollout: tokens/s of env + policy vs ``model.generate`` (plain softmax sampling,
  exactly ``new_tokens`` per row), interleaved, median of ``repeats``;
* TRePO/GRPO: seconds per update at ``B 8, G 4, R 32, m 2, K 4`` (issue 14's set-up),
  interleaved, the first pair left out, with positions encoded / decoded;
* trl: our GRPO update against TRL's ``GRPOTrainer`` (:func:`bench_vs_trl`);
* memory: peak above the model of GRPO, TRePO and PPO with each critic option, one fresh
  process each (:mod:`llm_mdp.bench.memory`), ``steps`` updates.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch


def _env_policy(batch: int, length: int, seed: int = 0) -> tuple[Any, Any]:
    from llm_mdp.envs import LLMTokenVectorEnv
    from llm_mdp.models import load_smollm2
    from llm_mdp.policies import CausalLMPolicy
    from llm_mdp.tasks.chat import chat_keyword_task

    model, tok = load_smollm2()
    task = chat_keyword_task(tokenizer=tok, max_response_tokens=length)
    env = LLMTokenVectorEnv(task, batch, info_text=False)
    return env, CausalLMPolicy(model, tok, vocab_size=len(tok), seed=seed)


def bench_rollout(batch: int, new_tokens: int, repeats: int) -> dict[str, Any]:
    from llm_mdp.bench.common import timed_side_by_side
    from llm_mdp.bench.rollout import run_env, run_generate

    env, policy = _env_policy(batch, new_tokens)
    idx = [i % len(env.task.prompts) for i in range(batch)]
    obs0, _ = env.reset(options={"prompt_indices": idx})
    ids0, mask0 = obs0["input_ids"][:, : env.P], obs0["attention_mask"][:, : env.P]
    with torch.inference_mode():
        (t_env, n_env), (t_gen, n_gen) = timed_side_by_side(
            [
                lambda: run_env(policy, env, idx),
                lambda: run_generate(policy.model, ids0, mask0, new_tokens, env.pad_token_id),
            ],
            1,
            repeats,
        )
    out = {"batch": batch, "new_tokens": new_tokens, "env_tok_s": n_env / t_env}
    out |= {"generate_tok_s": n_gen / t_gen, "env_tokens": n_env, "generate_tokens": n_gen}
    out["env_over_generate"] = out["env_tok_s"] / out["generate_tok_s"]
    return out


def bench_trepo_grpo(pairs: int) -> dict[str, Any]:
    from llm_mdp.agents import GRPO, TRePO
    from llm_mdp.agents.grpo import GRPOConfig
    from llm_mdp.agents.trepo import TRePOConfig
    from llm_mdp.bench.trepo_cost import interleaved_updates

    agents: dict[str, Any] = {}
    for name, cls, cfg in (
        ("grpo", GRPO, GRPOConfig(group_size=4, learning_rate=1e-5, seed=0)),
        (
            "trepo",
            TRePO,
            TRePOConfig(
                group_size=4, learning_rate=1e-5, seed=0, num_anchors=2, rollouts_per_prefix=4
            ),
        ),
    ):
        env, policy = _env_policy(8, 32)
        agents[name] = cls(env, policy, cfg)
    seconds, work = interleaved_updates(agents, pairs + 1)
    ratios = [t / g for t, g in zip(seconds["trepo"], seconds["grpo"], strict=True)]
    out: dict[str, Any] = {
        "settings": "B 8, G 4, R 32, m 2, K 4, chat_keyword",
        "ratio": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
    }
    for name in agents:
        out[name] = {"step_s": statistics.median(seconds[name])}
        for i, k in enumerate(("encoded", "decoded", "episodes")):
            out[name][f"{k}_per_update"] = statistics.median(w[i] for w in work[name])
    return out


def bench_vs_trl(steps: int) -> dict[str, Any]:
    """GRPO update seconds, ours vs TRL's ``GRPOTrainer``, on SmolLM2 (B 8, G 4, R 32,
    beta 0.04, lr 1e-5), interleaved step by step (:func:`~llm_mdp.bench.vs_trl.run_update_pair`,
    first step left out). Prompts: the chat-formatted ``chat_keyword`` questions of the most
    common token length (TRL's training forward wants equal lengths); reward: the shared
    text reward (fraction of the 32 slots holding ``"."``), the same function for both."""
    from collections import Counter

    from llm_mdp.bench.common import TextTask
    from llm_mdp.bench.vs_trl import run_update_pair, trl_status
    from llm_mdp.models import load_smollm2
    from llm_mdp.tasks.chat import CHAT_QUESTIONS, format_chat_prompt

    ok, why = trl_status()
    if not ok:
        return {"skipped": why}
    model, tok = load_smollm2()
    texts = [format_chat_prompt(tok, q) for q, _ in CHAT_QUESTIONS]
    sizes = [len(tok(t, add_special_tokens=False).input_ids) for t in texts]
    common = Counter(sizes).most_common(1)[0][0]
    prompts = [t for t, n in zip(texts, sizes, strict=True) if n == common]
    tt = TextTask(alphabet="", prompts=prompts, length=32, target=".", tokenizer=tok)
    out = run_update_pair(
        steps=steps,
        batch=8,
        group=4,
        length=32,
        model_size=(0, 0),
        seed=0,
        device=torch.device("cpu"),
        learning_rate=1e-5,
        evaluate=False,
        task=tt,
        pretrained=(model, tok),
    )
    out["prompts"], out["prompt_tokens"] = len(prompts), common
    return out


SETUPS: dict[str, tuple[str, dict[str, Any]]] = {
    "grpo": ("grpo", {"group_size": 4}),
    "trepo": ("trepo", {"group_size": 4, "num_anchors": 2, "rollouts_per_prefix": 4}),
    # one PPO epoch: every epoch repeats the first's forward and backward, so the peak is
    # the same with PPO's default 4 (a quarter of the time at 135M parameters on a CPU)
    "ppo-copy": ("ppo", {"critic": "copy", "epochs": 1}),
    "ppo-shared": ("ppo", {"critic": "shared", "epochs": 1}),
    "ppo-small": ("ppo", {"critic": "small", "epochs": 1}),
}


def bench_memory(batch: int, length: int, steps: int) -> dict[str, Any]:
    from llm_mdp.bench.memory import measure_in_subprocess

    rows = {}
    for label, (agent, config) in SETUPS.items():
        spec = {"agent": agent, "config": config, "model": "smollm2", "batch": batch}
        spec |= {"length": length, "steps": steps, "device": "cpu", "threads": 1}
        rows[label] = measure_in_subprocess(spec, timeout=3600)
        print(f"  memory {label:<10} +{rows[label]['delta_mb']:.0f} MB", flush=True)
    for r in rows.values():
        r["ratio_to_grpo"] = r["delta_mb"] / rows["grpo"]["delta_mb"]
    return {"batch": batch, "length": length, "steps": steps, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llm_mdp.bench.smollm2", description=__doc__)
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--only", default="rollout,trepo,trl,memory", help="sections (comma-separated)")
    p.add_argument("--repeats", type=int, default=3, help="timed rollouts / update pairs")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    res: dict[str, Any] = {}
    for section in args.only.split(","):
        t0 = time.perf_counter()
        if section == "rollout":
            res["rollout"] = bench_rollout(8, 32, args.repeats)
        elif section == "trepo":
            res["trepo"] = bench_trepo_grpo(args.repeats)
        elif section == "memory":
            res["memory"] = bench_memory(8, 32, 2)
        elif section == "trl":
            res["trl"] = bench_vs_trl(args.repeats + 1)
        else:
            p.error(f"unknown section {section!r}")
        res[f"{section}_seconds"] = time.perf_counter() - t0
        print(json.dumps({section: res[section]}, default=str), flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps(res, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
