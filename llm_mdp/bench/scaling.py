"""Time per GRPO update as the batch and the response length grow: two curves, one PNG.

Every point is a fresh run of ``steps`` updates of our GRPO (and, when TRL is installed
and the budget asks for it, of TRL's ``GRPOTrainer`` with matched settings, interleaved
step by step as in :func:`llm_mdp.bench.vs_trl.run_update_pair`); the first update is
warm-up, the median of the others is plotted. The task has a 256-token character
vocabulary so that a random model rarely emits EOS and responses run to the cap: the
length axis is the length actually generated (reported per point).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from llm_mdp.agents import GRPO
from llm_mdp.bench.common import TextTask, sync, text_task, wide_alphabet
from llm_mdp.envs import LLMTokenVectorEnv
from llm_mdp.policies import CausalLMPolicy


def scaling_task(length: int) -> TextTask:
    return text_task(length, alphabet=wide_alphabet(254), n_prompts=32, prompt_len=4)


def ours_only(
    *,
    batch: int,
    group: int,
    length: int,
    model_size: tuple[int, int],
    steps: int,
    device: torch.device,
    seed: int = 0,
) -> dict[str, Any]:
    """``steps`` updates of our GRPO alone: median seconds per update (first dropped)."""
    from llm_mdp.bench.vs_trl import Matched, load_model, save_model

    tt = scaling_task(length)
    with tempfile.TemporaryDirectory(prefix="llm-mdp-scaling-") as tmp:
        folder = Path(tmp) / "model"
        save_model(folder, tt, model_size, seed, max_positions=len(tt.prompts[0]) + length + 8)
        task = tt.task(tt.reward())
        env = LLMTokenVectorEnv(task, batch, device=device, info_text=False)
        policy = CausalLMPolicy(load_model(folder, device), task.tokenizer, seed=seed)
        agent = GRPO(env, policy, Matched(batch, group, length, seed=seed).ours())
        times, lengths = [], []
        for _ in range(max(1, steps)):
            t = time.perf_counter()
            m = agent.train_step()
            sync(device)
            times.append(time.perf_counter() - t)
            lengths.append(m["response/length"])
    return {
        "ours_step_s": statistics.median(times[1:] or times),
        "ours_mean_length": sum(lengths) / len(lengths),
    }


def point(
    *,
    batch: int,
    group: int,
    length: int,
    model_size: tuple[int, int],
    steps: int,
    device: torch.device,
    with_trl: bool,
) -> dict[str, Any]:
    if with_trl:
        from llm_mdp.bench import vs_trl

        r = vs_trl.run_update_pair(
            steps=max(2, steps),
            batch=batch,
            group=group,
            length=length,
            model_size=model_size,
            seed=0,
            device=device,
            evaluate=False,
            task=scaling_task(length),
        )
        keep = ("ours_step_s", "trl_step_s", "trl_over_ours", "ours_mean_length", "trl_mean_length")
        out = {k: r[k] for k in keep}
    else:
        out = ours_only(
            batch=batch,
            group=group,
            length=length,
            model_size=model_size,
            steps=steps,
            device=device,
        )
    return {"batch": batch, "length": length, **out}


def bench_scaling(
    *,
    batches: tuple[int, ...],
    lengths: tuple[int, ...],
    fixed_batch: int,
    fixed_length: int,
    group: int,
    model_size: tuple[int, int],
    steps: int,
    device: torch.device,
    with_trl: bool,
    log: Any = print,
) -> dict[str, Any]:
    """The batch sweep (response cap ``fixed_length``) and the length sweep (``fixed_batch``)."""
    curves: dict[str, list[dict[str, Any]]] = {"batch": [], "length": []}
    for axis, values in (("batch", batches), ("length", lengths)):
        for v in values:
            b, n = (v, fixed_length) if axis == "batch" else (fixed_batch, v)
            p = point(
                batch=b,
                group=min(group, b),
                length=n,
                model_size=model_size,
                steps=steps,
                device=device,
                with_trl=with_trl,
            )
            trl = (
                f", TRL {p['trl_step_s'] * 1e3:8.1f} ms ({p['trl_over_ours']:.2f}x)"
                if "trl_step_s" in p
                else ""
            )
            log(
                f"  scaling batch {b:>4} length {n:>4} (generated {p['ours_mean_length']:5.1f}): "
                f"ours {p['ours_step_s'] * 1e3:8.1f} ms/update{trl}"
            )
            curves[axis].append(p)
    return {
        "settings": {
            "fixed_batch": fixed_batch,
            "fixed_length": fixed_length,
            "group": group,
            "model": f"gpt2 {model_size[0]}x{model_size[1]}",
            "vocab": 256,
            "steps": steps,
            "with_trl": with_trl,
        },
        "curves": curves,
    }


def plot_scaling(res: dict[str, Any], path: str | Path) -> Path:
    """Two log-log panels: seconds per update vs batch, and vs response length."""
    from llm_mdp.plotting import _pyplot

    plt = _pyplot()
    s = res["settings"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, axis, fixed in (
        (axes[0], "batch", f"response cap {s['fixed_length']}"),
        (axes[1], "length", f"batch {s['fixed_batch']}"),
    ):
        pts = res["curves"][axis]
        if not pts:
            continue
        x = [p[axis] for p in pts]
        ax.plot(x, [p["ours_step_s"] for p in pts], "o-", label="llm-mdp GRPO")
        if all("trl_step_s" in p for p in pts):
            ax.plot(x, [p["trl_step_s"] for p in pts], "s--", label="TRL GRPOTrainer")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set(
            xlabel="batch (responses per update)" if axis == "batch" else "response cap (tokens)",
            ylabel="seconds per update",
            title=f"time per update vs {axis} ({fixed})",
        )
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"GRPO update (rollout + scoring + loss + step), {s['model']}, vocab 256", fontsize=9
    )
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
