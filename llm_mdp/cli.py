"""``llm-mdp``: train, compare, step through an episode, verify the theory, benchmark.

Every error a user can cause (an unknown name, a bad config file, a missing model)
prints one line ``llm-mdp: error: ...`` and exits with code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DEFAULTS: dict[str, Any] = {
    "agent": "trepo",
    "task": "reverse",
    "task_args": {"partial": True},
    "model": "tiny-gpt2",
    "updates": 300,
    "tokens": None,
    "num_envs": 64,
    "seed": 0,
    "device": "auto",
    "lr": None,
    "agent_config": {},
    "run_dir": None,
    "parallel": "dp",  # h-fsdp: dp | fsdp (AgentConfig.parallel)
}
TINY_LR = 2e-3  # learning rate used for the tiny random models unless --lr is given
TINY_MODELS = ("tiny-gpt2", "tiny-llama")


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


# ---------------------------------------------------------------------------- parsing
def _kv(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw  # a bare string
    return key.strip().replace("-", "_"), value


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--agent", help="reinforce | rloo | remax | grpo | ppo | trepo (default: trepo)")
    p.add_argument("--task", help="a built-in task (default: reverse with partial credit)")
    p.add_argument(
        "--task-arg",
        dest="task_args",
        action="append",
        type=_kv,
        metavar="KEY=VALUE",
        help="argument of the task factory, e.g. --task-arg partial=true (repeatable)",
    )
    p.add_argument(
        "--model",
        help="tiny-gpt2 | tiny-llama (random, offline) | a Hugging Face model id or local "
        "folder | a .gguf file (default: tiny-gpt2)",
    )
    p.add_argument("--updates", type=int, help="number of updates (default: 300)")
    p.add_argument("--tokens", type=int, help="stop after this many trained response tokens")
    p.add_argument("--num-envs", type=int, help="rollout batch size B (default: 64)")
    p.add_argument("--seed", type=int, help="seed of everything (default: 0)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (default: auto)")
    p.add_argument(
        "--lr",
        type=float,
        help=f"learning rate (default: {TINY_LR} for tiny models, else the agent's)",
    )
    p.add_argument(
        "--set",
        dest="agent_config",
        action="append",
        type=_kv,
        metavar="FIELD=VALUE",
        help="any agent config field, e.g. --set group_size=8 --set kl_coef=0.01 (repeatable)",
    )
    p.add_argument(
        "--config", type=Path, help="TOML or YAML file with these options (flags override it)"
    )
    p.add_argument(
        "--run-dir", type=Path, help="output folder (default: runs/<time>-<agent>-<task>)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--parallel",
        choices=("dp", "fsdp"),
        help="under torchrun: dp (a full model per rank) or fsdp (models sharded over the "
        "ranks, sharded checkpoints; docs/distributed.md) (default: dp)",
    )


def _read_config(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise CLIError(f"config file {str(path)!r} does not exist")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            raise CLIError(f"config file {str(path)!r}: expected a .toml, .yaml or .yml file")
    except CLIError:
        raise
    except Exception as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CLIError(f"cannot parse config file {str(path)!r}: {msg}") from None
    if not isinstance(data, dict):
        raise CLIError(
            f"config file {str(path)!r}: expected a table of options, got {type(data).__name__}"
        )
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - set(DEFAULTS))
    if unknown:
        raise CLIError(
            f"config file {str(path)!r}: unknown option(s) {unknown}; known: {sorted(DEFAULTS)}"
        )
    return data


def resolve_options(args: argparse.Namespace) -> dict[str, Any]:
    """Defaults < config file < command-line flags."""
    opts = {k: (dict(v) if isinstance(v, dict) else v) for k, v in DEFAULTS.items()}
    file_opts = _read_config(args.config) if getattr(args, "config", None) is not None else {}
    opts |= file_opts
    for key in DEFAULTS:
        value = getattr(args, key, None)
        if value is not None and key not in ("task_args", "agent_config"):
            opts[key] = value
    # the default task's arguments apply to the default task only; file, then flags, on top
    task_args = dict(DEFAULTS["task_args"]) if opts["task"] == DEFAULTS["task"] else {}
    opts["task_args"] = (
        task_args | dict(file_opts.get("task_args") or {}) | dict(args.task_args or [])
    )
    opts["agent_config"] = dict(file_opts.get("agent_config") or {}) | dict(args.agent_config or [])
    return opts


# ---------------------------------------------------------------------------- building
def build(opts: dict[str, Any]) -> tuple[Any, Any, Any]:
    """``(env, policy, agent_class_and_config)`` from resolved options; CLIError on bad input."""
    import torch

    from llm_mdp.agents import get_agent
    from llm_mdp.envs import LLMTokenVectorEnv
    from llm_mdp.policies import CausalLMPolicy, tiny_gpt2, tiny_llama
    from llm_mdp.tasks import TASKS, make_task
    from llm_mdp.utils import resolve_device

    try:
        agent_cls = get_agent(opts["agent"])
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    if opts["task"] not in TASKS:
        raise CLIError(f"unknown task {opts['task']!r}; known tasks: {', '.join(sorted(TASKS))}")
    from llm_mdp.distributed import init_from_env

    ctx = init_from_env()  # torchrun: one process group, each rank a shard of the batch
    device = resolve_device(opts["device"])
    if ctx.enabled and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    if int(opts["num_envs"]) % ctx.world_size:
        raise CLIError(
            f"--num-envs {opts['num_envs']} is not divisible by the world size {ctx.world_size}"
        )
    num_envs = int(opts["num_envs"]) // ctx.world_size
    model_name = str(opts["model"])
    tokenizer = None
    model = None
    if model_name not in TINY_MODELS:
        model, tokenizer = load_model(model_name)
    task_args = dict(opts["task_args"] or {})
    if tokenizer is not None:
        task_args["tokenizer"] = tokenizer
    try:
        task = make_task(opts["task"], **task_args)
    except TypeError as exc:
        raise CLIError(f"task {opts['task']!r}: bad --task-arg: {exc}") from None
    except ValueError as exc:
        raise CLIError(f"task {opts['task']!r}: {exc}") from None
    env = LLMTokenVectorEnv(task, num_envs, device=device)
    if model is None:
        factory = tiny_gpt2 if model_name == "tiny-gpt2" else tiny_llama
        model = factory(
            env.vocab_size,
            seed=int(opts["seed"]),
            pad_token_id=env.pad_token_id,
            eos_token_id=env.eos_token_id,
        )
    # h-fsdp: an FSDP run leaves the model in host memory; sharding moves it to the GPU
    sharded = dict(opts["agent_config"] or {}).get("parallel", opts.get("parallel")) == "fsdp"
    policy = CausalLMPolicy(
        model,
        env.tokenizer,
        vocab_size=env.vocab_size,
        seed=int(opts["seed"]),
        device=None if sharded else device,
    )
    fields = {f.name for f in dataclasses.fields(agent_cls.config_class)}
    cfg_args = dict(opts["agent_config"] or {})
    unknown = sorted(set(cfg_args) - fields)
    if unknown:
        raise CLIError(
            f"unknown {agent_cls.config_class.__name__} field(s) {unknown}; see `llm-mdp train --help`"
        )
    cfg_args.setdefault("seed", int(opts["seed"]))
    cfg_args.setdefault("parallel", opts.get("parallel") or "dp")
    lr = opts["lr"] if opts["lr"] is not None else (TINY_LR if model_name in TINY_MODELS else None)
    if lr is not None:
        cfg_args.setdefault("learning_rate", float(lr))
    try:
        config = agent_cls.config_class(**cfg_args)
    except (TypeError, ValueError) as exc:
        raise CLIError(f"{agent_cls.config_class.__name__}: {exc}") from None
    torch.manual_seed(int(opts["seed"]))
    return env, policy, (agent_cls, config)


def load_model(name: str) -> tuple[Any, Any]:
    """A Hugging Face causal LM and its tokenizer from an id, a folder or a ``.gguf`` file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(name)
    kwargs: dict[str, Any] = {}
    if path.suffix == ".gguf":
        if not path.exists():
            raise CLIError(f"model file {name!r} does not exist")
        from llm_mdp.models import load_gguf

        return load_gguf(path)
    looks_local = name.startswith((".", "/", "~")) or (
        os.sep in name and not _looks_like_hub_id(name)
    )
    if looks_local and not path.expanduser().exists():
        raise CLIError(f"model path {name!r} does not exist")
    try:
        tok = AutoTokenizer.from_pretrained(
            str(path.expanduser()) if looks_local else name, **kwargs
        )
        model = AutoModelForCausalLM.from_pretrained(
            str(path.expanduser()) if looks_local else name, **kwargs
        )
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CLIError(f"cannot load model {name!r}: {first}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model.eval(), tok


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not Path(name).exists()


# ---------------------------------------------------------------------------- train
def cmd_train(args: argparse.Namespace) -> int:
    from llm_mdp.agents.logger import read_metrics

    if args.resume is not None:
        run_dir = Path(args.resume)
        ckpt = run_dir / "checkpoint"  # sharded (FSDP) checkpoint folder, else one file
        ckpt = ckpt if ckpt.is_dir() else run_dir / "checkpoint.pt"
        if not (run_dir / "run.json").exists() or not ckpt.exists():
            raise CLIError(
                f"--resume {str(run_dir)!r}: no run.json and checkpoint.pt (or sharded "
                "checkpoint/) in that folder"
            )
        opts = json.loads((run_dir / "run.json").read_text())
        if args.updates is not None:
            opts["updates"] = args.updates
    else:
        opts = resolve_options(args)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir = Path(opts["run_dir"] or f"runs/{stamp}-{opts['agent']}-{opts['task']}")
    env, policy, (agent_cls, config) = build(opts)
    from llm_mdp.distributed import context

    main_rank = context().is_main  # under torchrun only rank 0 writes and prints
    opts["run_dir"] = str(run_dir)
    if args.resume is not None:
        agent = agent_cls.load(ckpt, env, policy, run_dir=run_dir)
        if main_rank:
            print(f"resuming {run_dir} at update {agent.update}")
    else:
        agent = agent_cls(env, policy, config, run_dir=run_dir)
        # FSDP: rollouts are collective, so every rank computes the sample tables
        before = sample_table(agent) if main_rank or config.parallel == "fsdp" else ""
        if main_rank:
            run_dir.mkdir(parents=True, exist_ok=True)
            record = opts | {"agent_config": dataclasses.asdict(config)}
            (run_dir / "run.json").write_text(json.dumps(record, indent=2, default=str))
            (run_dir / "samples_before.txt").write_text(before)
    if main_rank:
        print(
            f"{agent_cls.__name__} on {opts['task']} with {opts['model']} ({_count(policy)} "
            f"parameters), {env.num_envs * context().world_size} episodes per update, device "
            f"{env.device} x {context().world_size} process(es) -> {run_dir}"
        )
    from llm_mdp.agents import TrainingError

    try:
        agent.learn(
            int(opts["updates"]), total_tokens=opts.get("tokens"), progress=not args.no_progress
        )
    except TrainingError as exc:
        print(f"llm-mdp: error: {exc}", file=sys.stderr)
        return 1
    if not main_rank and agent.config.parallel != "fsdp":
        return 0
    after, greedy = sample_table(agent), agent.evaluate()  # collective under FSDP
    if not main_rank:
        return 0
    (run_dir / "samples_after.txt").write_text(after)
    rows = read_metrics(run_dir / "metrics.csv")
    from llm_mdp.plotting import plot_learning_curve

    png = plot_learning_curve(
        rows,
        run_dir / "curve.png",
        title=f"{agent_cls.__name__} on {opts['task']}",
        optimum=env.task.optimal_reward,
    )
    k = max(1, len(rows) // 10)
    first = sum(r["reward/mean"] for r in rows[:k]) / k
    last = sum(r["reward/mean"] for r in rows[-k:]) / k
    print(f"mean reward: first {k} updates {first:.3f} -> last {k} updates {last:.3f}")
    print(f"greedy reward over the prompt pool: {greedy:.3f}")
    ckpt_name = "checkpoint/" if agent.config.parallel == "fsdp" else "checkpoint.pt"
    print(
        f"wrote {run_dir}/: run.json metrics.csv {ckpt_name} {png.name} "
        "samples_before.txt samples_after.txt"
    )
    return 0


def _count(policy: Any) -> str:
    n = sum(p.numel() for p in policy.parameters())
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def sample_table(agent: Any, n: int = 8) -> str:
    """Greedy responses to the first ``n`` prompts of the pool with their rewards
    (collective under FSDP: every rank calls it)."""
    from llm_mdp import fsdp
    from llm_mdp.agents import rollout

    env = agent.env
    idx = list(range(min(n, len(env.task.prompts))))
    lines = [f"update {agent.update}: greedy responses"]
    for lo in range(0, len(idx), env.num_envs):
        chunk = idx[lo : lo + env.num_envs]
        with fsdp.gathered(agent.policy):
            ro = rollout(
                env,
                agent.policy,
                {"prompt_indices": chunk + [chunk[0]] * (env.num_envs - len(chunk))},
                greedy=True,
            )
        batch = env.response_batch()
        for j in range(len(chunk)):
            lines.append(
                f"{batch.prompts[j]!r:>24} -> {batch.responses[j]!r:<24} reward {float(ro.rewards[j]):.3f}"
            )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- compare
def cmd_compare(args: argparse.Namespace) -> int:
    from llm_mdp.agents import AGENTS
    from llm_mdp.agents.logger import read_metrics
    from llm_mdp.plotting import plot_comparison

    names = [a.strip() for a in args.agents.split(",") if a.strip()]
    for a in names:
        if a not in AGENTS:
            raise CLIError(f"unknown agent {a!r}; known agents: {', '.join(AGENTS)}")
    opts = resolve_options(args)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(opts["run_dir"] or f"runs/{stamp}-compare-{opts['task']}")
    runs: dict[str, list[dict[str, float]]] = {}
    summary = []
    optimum = None
    for name in names:
        o = dict(opts, agent=name, agent_config=dict(opts["agent_config"]))
        env, policy, (cls, config) = build(o)
        optimum = env.task.optimal_reward
        agent = cls(env, policy, config, run_dir=out / name)
        t0 = time.perf_counter()
        agent.learn(int(o["updates"]), progress=not args.no_progress)
        runs[name] = read_metrics(out / name / "metrics.csv")
        k = max(1, len(runs[name]) // 10)
        summary.append(
            (
                name,
                sum(r["reward/mean"] for r in runs[name][-k:]) / k,
                agent.evaluate(),
                agent.episodes,
                time.perf_counter() - t0,
            )
        )
    png = plot_comparison(
        runs,
        out / "compare.png",
        title=f"{opts['task']}: equal updates of {opts['num_envs']} episodes",
        optimum=optimum,
    )
    print(f"{'agent':<10} {'reward(last 10%)':>16} {'greedy':>8} {'episodes':>9} {'seconds':>8}")
    for name, r, g, e, s in summary:
        print(f"{name:<10} {r:>16.3f} {g:>8.3f} {e:>9d} {s:>8.1f}")
    print(f"wrote {png}")
    return 0


# ---------------------------------------------------------------------------- episode
def cmd_episode(args: argparse.Namespace) -> int:
    """Walk one episode: state, action, reward at every step (the ZRA made visible)."""
    import torch

    from llm_mdp.envs import LLMTokenEnv

    opts = resolve_options(args)
    opts["num_envs"] = 1
    env_vec, policy, _ = build(opts)
    if args.checkpoint is not None:
        state = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
        policy.load_state_dict(state["modules"]["policy"])
    env = LLMTokenEnv(env_vec.task, max_response_tokens=env_vec.R)
    tok = env.tokenizer
    reset_opts = {"prompt": args.prompt} if args.prompt is not None else None
    try:
        obs, info = env.reset(seed=opts["seed"], options=reset_opts)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    P = env.P
    state_ = None
    total, t, done = 0.0, 0, False
    print(f"task {env.task.name!r}: {env.task.description}")
    print(
        f"{'t':>3}  {'state s_t (prompt | response so far)':<40} {'action w_t':<12} {'reward r_t':>10}  done"
    )
    while not done:
        t += 1
        ids = obs["input_ids"][obs["attention_mask"].astype(bool)].tolist()
        n_prompt = int(obs["attention_mask"][:P].sum())
        text = f"{tok.decode(ids[:n_prompt])!r} | {tok.decode(ids[n_prompt:])!r}"
        o = {k: torch.as_tensor(v).unsqueeze(0) for k, v in obs.items()}
        action, _, state_ = policy.act(o, state_, greedy=args.greedy)
        a = int(action[0])
        obs, r, term, trunc, info = env.step(a)
        total += r
        done = term or trunc
        flag = "terminated" if term else "truncated" if trunc else ""
        print(f"{t:>3}  {text:<40} {tok.convert_ids_to_tokens(a)!r:<12} {r:>10.4f}  {flag}")
    print(
        f"response {info['response']!r}: every reward before the last is 0.0; the sum is RM(W) = {total:.4f}"
    )
    if "token_rewards" in info:
        g = env.task.gamma
        tr = info["token_rewards"]
        s = sum(g**i * x for i, x in enumerate(tr))
        print(
            f"hidden token rewards r_t = {[round(float(x), 4) for x in tr]}; sum_t gamma^(t-1) r_t = {s:.4f} (gamma = {g})"
        )
    return 0


# ---------------------------------------------------------------------------- main
def _catalogue() -> str:
    """Tasks and agent config fields, for ``train --help``."""
    from llm_mdp.agents import AGENTS
    from llm_mdp.tasks import TASKS

    lines = ["tasks (--task NAME, factory arguments via --task-arg):"]
    for name, factory in sorted(TASKS.items()):
        doc = (factory.__doc__ or "").strip().splitlines()
        lines.append(f"  {name:<16} {doc[0] if doc else ''}")
    from llm_mdp.agents import AgentConfig

    base = {f.name: f.default for f in dataclasses.fields(AgentConfig)}
    lines.append("\nagent config (--set FIELD=VALUE; every field documented in llm_mdp.agents)")
    lines.append("  shared: " + ", ".join(f"{k}={v}" for k, v in base.items()))
    for name, cls in AGENTS.items():
        own = {f.name: f.default for f in dataclasses.fields(cls.config_class)}
        diff = [f"{k}={v}" for k, v in own.items() if k not in base or base[k] != v]
        lines.append(f"  {name}: " + (", ".join(diff) or "the shared defaults"))
    return "\n".join(lines)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm-mdp",
        description="Reinforcement learning on language models as a token-level MDP "
        "(He, Xia, Zhou, Wei, arXiv 2506.02553).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser(
        "train",
        help="train an agent (defaults: TRePO on reverse, tiny GPT-2, CPU, ~1 min)",
        epilog=_catalogue(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_run_options(p)
    p.add_argument(
        "--resume", type=Path, metavar="RUN_DIR", help="continue a run from its checkpoint"
    )
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("compare", help="several agents on one task, same budget, one plot")
    _add_run_options(p)
    p.add_argument(
        "--agents",
        default="reinforce,rloo,remax,grpo,ppo,trepo",
        help="comma-separated agent names",
    )
    p.set_defaults(func=cmd_compare)
    p = sub.add_parser("episode", help="step through one episode: zero rewards, then RM(W)")
    _add_run_options(p)
    p.add_argument("--prompt", help="prompt text (default: one drawn from the task)")
    p.add_argument("--greedy", action="store_true", help="greedy actions instead of sampling")
    p.add_argument("--checkpoint", type=Path, help="a checkpoint.pt whose policy acts")
    p.set_defaults(func=cmd_episode)
    p = sub.add_parser(
        "verify", help="check every estimator against the exact gradient", add_help=False
    )
    p.set_defaults(func=None)
    p = sub.add_parser(
        "bench", help="benchmarks against model.generate, TRL, and memory", add_help=False
    )
    p.set_defaults(func=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = make_parser()
    try:
        if argv and argv[0] == "verify":
            from llm_mdp.theory import verify_cli

            return int(verify_cli(argv[1:]))
        if argv and argv[0] == "bench":
            from llm_mdp.bench import bench_cli

            return int(bench_cli(argv[1:]))
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        return int(args.func(args))
    except CLIError as exc:
        print(f"llm-mdp: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llm-mdp: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
