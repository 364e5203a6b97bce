"""Rollout throughput: ``LLMTokenVectorEnv`` + ``CausalLMPolicy`` vs ``model.generate``.

Same tiny GPT-2, same batch, same prompts, side by side in one process: warm-up runs,
then the median of ``repeats`` timed runs, interleaved across the methods (A B C A B C)
so load from other processes hits them evenly. ``generate`` always produces
``new_tokens`` tokens per row (``min_new_tokens``); the env loop can stop a row early at
EOS, so every figure is *generated tokens* per second, counted from the masks.

Columns:
  env+act     ``env.reset`` / ``policy.act`` / ``env.step`` on ``LLMTokenVectorEnv``
  act only    ``policy.act`` on the env's layout written inline (the policy's own cost)
  generate    ``model.generate(do_sample=True, top_k=0, top_p=1, max/min_new_tokens=N)``

Also times the sampler alone: ``torch.multinomial`` vs the inverse-CDF draw (single
cumsum, and the default, which is two-level on CPU for large vocabularies).
"""

from __future__ import annotations

from typing import Any

import torch

from llm_mdp.bench.common import timed_side_by_side, wide_env_model
from llm_mdp.envs import LLMTokenVectorEnv
from llm_mdp.policies import CausalLMPolicy, sample_categorical


def run_env(policy: CausalLMPolicy, env: LLMTokenVectorEnv, prompt_indices: list[int]) -> int:
    """One full batched rollout through the env; returns the generated token count."""
    obs, _ = env.reset(options={"prompt_indices": prompt_indices})
    state = None
    while not env.all_done:
        actions, _, state = policy.act(obs, state)
        obs, _, _, _, _ = env.step(actions)
    return int(obs["attention_mask"][:, env.P :].sum())


def run_act(policy: CausalLMPolicy, ids0: torch.Tensor, mask0: torch.Tensor, P: int, n: int) -> int:
    """The env's layout and transition written inline: every row runs ``n`` steps."""
    ids, mask = ids0.clone(), mask0.clone()
    rows = torch.arange(ids.shape[0], device=ids.device)
    state = None
    for t in range(n):
        actions, _, state = policy.act({"input_ids": ids, "attention_mask": mask}, state)
        ids[rows, P + t] = actions
        mask[rows, P + t] = 1
    return int(mask[:, P:].sum())


def run_generate(model: Any, ids: torch.Tensor, mask: torch.Tensor, n: int, pad: int) -> int:
    """``model.generate`` sampling exactly ``n`` new tokens per row (plain softmax sampling)."""
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=True,
        max_new_tokens=n,
        min_new_tokens=n,
        pad_token_id=pad,
        top_k=0,
        top_p=1.0,
    )
    return int(out[:, ids.shape[1] :].numel())


def bench_sampler(
    vocab_size: int, batch: int, device: torch.device, repeats: int
) -> dict[str, float]:
    """Seconds per draw: ``torch.multinomial``, single-cumsum inverse CDF, default inverse CDF."""
    gen = torch.Generator(device=device).manual_seed(0)
    probs = torch.softmax(3 * torch.randn(batch, vocab_size, device=device, generator=gen), -1)
    fns = {
        "multinomial": lambda: torch.multinomial(probs, 1, generator=gen),
        "icdf_cumsum": lambda: sample_categorical(probs, gen, blocked=False),
        "icdf_default": lambda: sample_categorical(probs, gen),
    }
    timed = timed_side_by_side(
        [lambda f=f: int(f().numel()) for f in fns.values()],  # type: ignore[misc]
        warmup=3,
        repeats=repeats,
    )
    return {k: t for k, (t, _) in zip(fns, timed, strict=True)}


def bench_rollout_cell(
    vocab: int,
    batch: int,
    *,
    new_tokens: int,
    model_size: tuple[int, int],
    device: torch.device,
    warmup: int,
    repeats: int,
    sampler: bool = True,
) -> dict[str, Any]:
    """One (vocab, batch) cell: tokens/s of env+act, act only and generate, and ratios."""
    env, model = wide_env_model(
        vocab, batch, new_tokens, model_size, n_prompts=batch, device=device
    )
    policy = CausalLMPolicy(model, env.tokenizer, seed=0)
    idx = list(range(batch))
    obs0, _ = env.reset(options={"prompt_indices": idx})
    env_ids, env_mask = obs0["input_ids"], obs0["attention_mask"]
    ids0, mask0 = env_ids[:, : env.P], env_mask[:, : env.P]  # left-padded prompts
    with torch.inference_mode():
        (t_env, n_env), (t_act, n_act), (t_gen, n_gen) = timed_side_by_side(
            [
                lambda: run_env(policy, env, idx),
                lambda: run_act(policy, env_ids, env_mask, env.P, new_tokens),
                lambda: run_generate(model, ids0, mask0, new_tokens, env.pad_token_id),
            ],
            warmup,
            repeats,
        )
    row: dict[str, Any] = {
        "vocab": vocab,
        "batch": batch,
        "new_tokens": new_tokens,
        "env_tokens": n_env,
        "env_tok_s": n_env / t_env,
        "act_tok_s": n_act / t_act,
        "generate_tok_s": n_gen / t_gen,
    }
    row["env_over_generate"] = row["env_tok_s"] / row["generate_tok_s"]
    row["act_over_generate"] = row["act_tok_s"] / row["generate_tok_s"]
    if sampler:
        row["sampler_s"] = bench_sampler(vocab, batch, device, max(repeats, 10))
    return row


def bench_rollout(
    vocabs: tuple[int, ...],
    batches: tuple[int, ...],
    *,
    new_tokens: int,
    model_size: tuple[int, int],
    device: torch.device,
    warmup: int,
    repeats: int,
    log: Any = print,
) -> list[dict[str, Any]]:
    """Every (vocab, batch) cell of the grid."""
    rows = []
    for vocab in vocabs:
        for batch in batches:
            row = bench_rollout_cell(
                vocab,
                batch,
                new_tokens=new_tokens,
                model_size=model_size,
                device=device,
                warmup=warmup,
                repeats=repeats,
            )
            log(
                f"  rollout vocab {vocab:>6} batch {batch:>4}: env+act {row['env_tok_s']:>10,.0f} "
                f"tok/s, generate {row['generate_tok_s']:>10,.0f} tok/s, "
                f"ratio {row['env_over_generate']:.2f}x"
            )
            rows.append(row)
    return rows


def format_rollout(rows: list[dict[str, Any]]) -> str:
    """The rollout table: tokens/s and ratios, then the sampler times."""
    lines = [
        "tokens/s (median)            env+act     act only     generate  env+act/gen  act/gen",
    ]
    for r in rows:
        lines.append(
            f"vocab {r['vocab']:>6} batch {r['batch']:>4} {r['env_tok_s']:>12,.0f} "
            f"{r['act_tok_s']:>12,.0f} {r['generate_tok_s']:>12,.0f} "
            f"{r['env_over_generate']:>11.2f}x {r['act_over_generate']:>7.2f}x"
        )
    lines.append("")
    lines.append("sampler (one draw)          multinomial  icdf cumsum  icdf default  mult/default")
    for r in rows:
        s = r.get("sampler_s")
        if not s:
            continue
        lines.append(
            f"vocab {r['vocab']:>6} batch {r['batch']:>4} {s['multinomial'] * 1e3:>9.3f} ms "
            f"{s['icdf_cumsum'] * 1e3:>9.3f} ms {s['icdf_default'] * 1e3:>10.3f} ms "
            f"{s['multinomial'] / s['icdf_default']:>11.1f}x"
        )
    return "\n".join(lines)
