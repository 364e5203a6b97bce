"""Rollout throughput: our KV-cached ``policy.act`` loop vs ``model.generate``.

Same tiny GPT-2, same batch, same prompts, side by side in one process: warm-up runs,
then the median of ``--repeats`` timed runs, interleaved across the methods (A B C A B C)
so load from other processes hits them evenly. Rows of the ``generate`` baseline always
produce ``--new-tokens`` tokens (``min_new_tokens``); the env loop can stop a row early
at EOS, so every figure is *generated tokens* per second, counted from the masks.

Columns:
  env+act     ``env.reset`` / ``policy.act`` / ``env.step`` on ``LLMTokenVectorEnv``
  act only    ``policy.act`` on a simulated env layout (no env: the policy's own cost)
  generate    ``model.generate(do_sample=True, max_new_tokens=N, min_new_tokens=N)``

Also times the sampler alone: ``torch.multinomial`` vs the inverse-CDF draw (single
cumsum, and the default, which is two-level on CPU for large vocabularies).

Usage::

    python benchmarks/rollout.py                       # vocab 256 and 50257, CPU
    python benchmarks/rollout.py --vocab 50257 --repeats 3 --device auto
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from llm_mdp.policies import CausalLMPolicy, sample_categorical, tiny_gpt2
from llm_mdp.tasks import Task
from llm_mdp.tasks.tokenizers import char_tokenizer


def make_task(vocab_size: int, n_prompts: int, new_tokens: int, seed: int = 0) -> Task:
    """A task whose character tokenizer has exactly ``vocab_size`` tokens; reward 0."""
    # ids 0/1 are <pad>/<eos>; characters from U+0100 up (no newline, no surrogates)
    alphabet = "".join(chr(0x100 + i) for i in range(vocab_size - 2))
    tok = char_tokenizer(alphabet)
    gen = torch.Generator().manual_seed(seed)
    prompts = []
    for _ in range(n_prompts):
        n = int(torch.randint(4, 17, (1,), generator=gen))
        idx = torch.randint(0, len(alphabet), (n,), generator=gen).tolist()
        prompts.append("".join(alphabet[i] for i in idx))
    return Task(
        name=f"bench_v{vocab_size}",
        prompts=prompts,
        reward_fn=lambda batch: torch.zeros(len(batch), dtype=torch.float64),
        tokenizer=tok,
        max_response_tokens=new_tokens,
    )


def _time_once(fn: Callable[[], int]) -> tuple[float, int]:
    t0 = time.perf_counter()
    tokens = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0, tokens


def timed(fn: Callable[[], int], warmup: int, repeats: int) -> tuple[float, int]:
    """Median seconds of ``fn()`` and the token count it returned."""
    return timed_side_by_side([fn], warmup, repeats)[0]


def timed_side_by_side(
    fns: list[Callable[[], int]], warmup: int, repeats: int
) -> list[tuple[float, int]]:
    """Median seconds and token count of each ``fn``, runs interleaved (A B C A B C ...).

    Interleaving spreads load from other processes evenly over the methods compared.
    """
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    tokens = [0] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            dt, tokens[i] = _time_once(fn)
            times[i].append(dt)
    return [(statistics.median(t), n) for t, n in zip(times, tokens, strict=True)]


def run_env(policy: CausalLMPolicy, env, prompt_indices: list[int]) -> int:
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


def run_generate(model, ids: torch.Tensor, mask: torch.Tensor, n: int, pad: int) -> int:
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


def bench_sampler(vocab_size: int, batch: int, device: torch.device, repeats: int) -> list[float]:
    """Seconds per draw: multinomial, single-cumsum inverse CDF, default (auto) inverse CDF."""
    gen = torch.Generator(device=device).manual_seed(0)
    probs = torch.softmax(3 * torch.randn(batch, vocab_size, device=device, generator=gen), -1)
    fns = [
        lambda: torch.multinomial(probs, 1, generator=gen),
        lambda: sample_categorical(probs, gen, blocked=False),
        lambda: sample_categorical(probs, gen),
    ]
    return [timed(lambda f=f: int(f().numel()), 5, repeats)[0] for f in fns]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--vocab", type=int, nargs="+", default=[256, 50257])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--n-layer", type=int, default=2)
    ap.add_argument("--n-embd", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    from llm_mdp.envs import LLMTokenVectorEnv
    from llm_mdp.utils import resolve_device

    device = resolve_device(args.device)
    print(
        f"device={device} threads={torch.get_num_threads()} torch={torch.__version__} "
        f"batch={args.batch} new_tokens={args.new_tokens} gpt2 {args.n_layer}x{args.n_embd}"
    )
    rows = []
    for vocab in args.vocab:
        task = make_task(vocab, n_prompts=args.batch, new_tokens=args.new_tokens)
        env = LLMTokenVectorEnv(task, args.batch, device=device, info_text=False)
        model = tiny_gpt2(
            vocab,
            n_layer=args.n_layer,
            n_embd=args.n_embd,
            max_positions=env.W + 8,
            pad_token_id=env.pad_token_id,
            eos_token_id=env.eos_token_id,
        ).to(device)
        policy = CausalLMPolicy(model, task.tokenizer, seed=0)
        idx = list(range(args.batch))
        obs0, _ = env.reset(options={"prompt_indices": idx})
        env_ids, env_mask = obs0["input_ids"], obs0["attention_mask"]
        ids0, mask0 = env_ids[:, : env.P], env_mask[:, : env.P]  # left-padded prompts
        with torch.inference_mode():
            (t_env, n_env), (t_act, n_act), (t_gen, n_gen) = timed_side_by_side(
                [
                    lambda: run_env(policy, env, idx),  # noqa: B023
                    lambda: run_act(policy, env_ids, env_mask, env.P, args.new_tokens),  # noqa: B023
                    lambda: run_generate(model, ids0, mask0, args.new_tokens, env.pad_token_id),  # noqa: B023
                ],
                args.warmup,
                args.repeats,
            )
        samp = bench_sampler(vocab, args.batch, device, max(args.repeats, 20))
        rows.append((vocab, n_env / t_env, n_act / t_act, n_gen / t_gen, n_env, samp))

    print()
    print("tokens/s (median)     env+act     act only    generate   env+act/gen  act/gen")
    for vocab, r_env, r_act, r_gen, n_env, *_ in rows:
        print(
            f"vocab {vocab:>6}  {r_env:>12,.0f} {r_act:>12,.0f} {r_gen:>11,.0f}"
            f"  {r_env / r_gen:>10.2f}x {r_act / r_gen:>7.2f}x   (env tokens {n_env})"
        )
    print()
    print(f"sampler, batch {args.batch}   multinomial   icdf cumsum   icdf (default)   ratios")
    for vocab, *_, (t_mult, t_cum, t_auto) in rows:
        print(
            f"vocab {vocab:>6}   {t_mult * 1e3:8.3f} ms   {t_cum * 1e3:8.3f} ms   {t_auto * 1e3:8.3f} ms"
            f"      multinomial/cumsum {t_mult / t_cum:5.1f}x, multinomial/default {t_mult / t_auto:6.1f}x"
        )


if __name__ == "__main__":
    main()
