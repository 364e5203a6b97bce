"""``llm-mdp train``: one run into a run folder that is never lost.

A run folder holds ``run.json`` (the options, re-readable with ``--config``),
``metrics.csv`` (one row per update), ``checkpoint.pt``, ``curve.png`` and greedy
samples before and after. Training into a folder that holds a run is refused unless
``--resume`` (continue it: only ``--updates``, ``--tokens``, ``--threads`` and
``--no-progress`` may change) or ``--overwrite`` (replace it). Ctrl-C or SIGTERM
finishes the update, saves a checkpoint and exits 130; ``--resume`` then continues
exactly where it stopped, and metric rows logged after the last checkpoint are dropped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

from llm_mdp.cli.options import (
    DEFAULTS,
    CLIError,
    check_writable_dir,
    checkpoint_path,
    clear_run,
    given_options,
    held_run_files,
    read_options_file,
    resolve_options,
    resume_conflicts,
)


def plan_fresh(args: argparse.Namespace) -> tuple[dict[str, Any], Path]:
    """Options and folder of a new run; refuses a folder that holds a run."""
    opts = resolve_options(args)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path(opts["run_dir"] or f"runs/{stamp}-{opts['agent']}-{opts['task']}")
    check_writable_dir(run_dir, "--run-dir")
    held = held_run_files(run_dir)
    if held and not args.overwrite:
        raise CLIError(
            f"--run-dir {str(run_dir)!r} already holds a run ({', '.join(held)}); continue it "
            f"with --resume {run_dir}, replace it with --overwrite, or choose another folder"
        )
    opts["run_dir"] = str(run_dir)
    return opts, run_dir


def plan_resume(args: argparse.Namespace) -> tuple[dict[str, Any], Path]:
    """Options of the run in ``--resume``'s folder, with the safe changes applied."""
    run_dir = Path(args.resume)
    if args.overwrite:
        raise CLIError("--resume and --overwrite: give one of them")
    if args.config is not None:
        raise CLIError(
            f"--resume takes the run's options from {run_dir / 'run.json'}, not --config"
        )
    if not run_dir.is_dir():
        raise CLIError(f"--resume {str(run_dir)!r}: no such folder")
    record = read_options_file(run_dir / "run.json", "run file")
    if not checkpoint_path(run_dir).exists():
        raise CLIError(
            f"--resume {str(run_dir)!r}: no checkpoint.pt or checkpoint/ (stopped before its "
            "first update); "
            "start it again with --run-dir ... --overwrite"
        )
    flags = given_options(args)
    conflicts = resume_conflicts(flags, record)
    if conflicts:
        raise CLIError(
            f"--resume {run_dir} cannot change {'; '.join(conflicts)}: only --updates, "
            "--tokens, --threads and --no-progress may change"
        )
    check_writable_dir(run_dir, "--resume")
    full = dict(DEFAULTS) | record
    full |= {k: flags[k] for k in ("updates", "tokens", "threads") if k in flags}
    full["run_dir"] = str(run_dir)
    return full, run_dir


def cmd_train(args: argparse.Namespace) -> int:
    """``llm-mdp train``: see the module docstring."""
    opts, run_dir = plan_resume(args) if args.resume is not None else plan_fresh(args)
    from llm_mdp.cli.build import build

    env, policy, agent_cls, config = build(opts)
    from llm_mdp.agents import CheckpointError, TrainingError, TrainingInterrupted
    from llm_mdp.distributed import context

    main_rank = context().is_main  # under torchrun only rank 0 writes and prints
    if args.resume is not None:
        try:
            agent = agent_cls.load(checkpoint_path(run_dir), env, policy, run_dir=run_dir)
        except CheckpointError as exc:
            raise CLIError(str(exc)) from None
        if agent.update >= opts["updates"]:
            print(
                f"{run_dir} is at update {agent.update}, at or past --updates "
                f"{opts['updates']}: nothing to do (raise --updates to train further)"
            )
            return 0
    else:
        agent = agent_cls(env, policy, config, run_dir=run_dir)
    # under FSDP a rollout is collective: every rank computes the greedy samples
    collective = agent.config.parallel == "fsdp"
    before = sample_table(agent) if args.resume is None and (main_rank or collective) else ""
    if main_rank:
        write_record(run_dir, opts, agent, resumed=args.resume is not None, samples=before)
        print(
            f"{agent_cls.__name__} on {opts['task']} with {opts['model']} ({_count(policy)} "
            f"parameters), {env.num_envs * context().world_size} episodes per update, device "
            f"{env.device} x {context().world_size} process(es) -> {run_dir}"
            + (f", resuming at update {agent.update}" if args.resume is not None else "")
        )
    try:
        agent.learn(opts["updates"], total_tokens=opts["tokens"], progress=not args.no_progress)
    except TrainingError as exc:
        print(f"llm-mdp: error: {exc}", file=sys.stderr)
        return 1
    except TrainingInterrupted as exc:
        if exc.checkpoint is not None:
            kept = f"checkpoint saved at update {exc.update}"
        else:
            kept = "interrupted inside an update: the last checkpoint is kept"
        if checkpoint_path(run_dir).exists():
            then = f"continue with: llm-mdp train --resume {run_dir}"
        else:
            then = f"no checkpoint yet; start again with --run-dir {run_dir} --overwrite"
        print(f"llm-mdp: interrupted; {kept}; {then}", file=sys.stderr)
        return 128 + exc.signum
    if main_rank or collective:
        summarize(agent, run_dir, opts, write=main_rank)
    return 0


def write_record(
    run_dir: Path, opts: dict[str, Any], agent: Any, *, resumed: bool, samples: str
) -> None:
    """Create the folder and write ``run.json`` (and the greedy samples of a new run)."""
    path = run_dir / "run.json"
    if resumed:
        record = json.loads(path.read_text())
        record["updates"], record["tokens"] = opts["updates"], opts["tokens"]
        record["threads"] = opts["threads"]
        record.setdefault("resumed", []).append(
            {"at_update": agent.update, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        )
    else:
        clear_run(run_dir)  # only --overwrite gets here with files in it
        run_dir.mkdir(parents=True, exist_ok=True)
        record = opts | {"agent_config": dataclasses.asdict(agent.config)}
        (run_dir / "samples_before.txt").write_text(samples)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    tmp.replace(path)


def summarize(agent: Any, run_dir: Path, opts: dict[str, Any], *, write: bool = True) -> None:
    """Greedy samples, the learning curve and the reward summary of a finished run.

    Under FSDP every rank calls it (the greedy rollouts are collective); only the rank
    with ``write`` writes files and prints.
    """
    from llm_mdp.agents.logger import read_metrics
    from llm_mdp.plotting import plot_learning_curve

    after, greedy = sample_table(agent), agent.evaluate()
    if not write:
        return
    (run_dir / "samples_after.txt").write_text(after)
    rows = read_metrics(run_dir / "metrics.csv")
    png = plot_learning_curve(
        rows,
        run_dir / "curve.png",
        title=f"{type(agent).__name__} on {opts['task']}",
        optimum=agent.env.task.optimal_reward,
    )
    k = max(1, len(rows) // 10)
    first = sum(r["reward/mean"] for r in rows[:k]) / k
    last = sum(r["reward/mean"] for r in rows[-k:]) / k
    print(f"mean reward: first {k} updates {first:.3f} -> last {k} updates {last:.3f}")
    # what the policy does, not only what it scores: does it stop, and how long it talks
    if rows and "response/eos_frac" in rows[-1]:
        eos = sum(r["response/eos_frac"] for r in rows[-k:]) / k
        length = sum(r["response/length"] for r in rows[-k:]) / k
        print(
            f"last {k} updates: {eos:.0%} of responses ended with EOS, mean length "
            f"{length:.2f} tokens (cap {agent.env.R})"
        )
    print(f"greedy reward over the prompt pool: {greedy:.3f}")
    print(
        f"wrote {run_dir}/: run.json metrics.csv {checkpoint_path(run_dir).name} {png.name} "
        "samples_before.txt samples_after.txt"
    )


def _count(policy: Any) -> str:
    n = sum(p.numel() for p in policy.parameters())
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def sample_table(agent: Any, n: int = 8) -> str:
    """Greedy responses to the first ``n`` prompts of the pool with their rewards
    (collective under FSDP: every rank calls it)."""
    from llm_mdp import fsdp
    from llm_mdp.agents import rollout
    from llm_mdp.tasks.turns import describe_turns

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
            response = repr(batch.responses[j])
            if env.task.multi_turn and batch.policy_mask is not None:
                n = int(batch.response_mask[j].sum())
                ids = batch.response_ids[j, :n].tolist()
                response = describe_turns(env.tokenizer, ids, batch.policy_mask[j, :n].tolist())
            lines.append(
                f"{batch.prompts[j]!r:>24} -> {response:<24} reward {float(ro.rewards[j]):.3f}"
            )
    return "\n".join(lines) + "\n"
