"""``llm-mdp bench``: every peer side by side in one run, a table of ratios, files in ``--out``.

Sections (``--only`` picks some, comma-separated):

* ``rollout``  tokens/s of env + policy vs ``model.generate`` (vocab x batch grid)
* ``update``   seconds per GRPO update, ours vs TRL's ``GRPOTrainer``; reward after the
  same number of updates (needs ``trl``)
* ``numerics`` our GRPO loss and gradient vs TRL's ``_compute_loss`` on a fixed batch,
  per loss type (needs ``trl``)
* ``memory``   peak memory of PPO, GRPO, TRePO updates, each in a fresh process
* ``scaling``  seconds per update vs batch and response length (``scaling.png``)
* ``trepo``    seconds per TRePO update over GRPO's on ``llm-mdp train``'s defaults, with
  the positions each encodes and decodes per update
* ``critics``  PPO with each critic option (copy, shared trunk, small) beside GRPO and
  TRePO: seconds per update and reward after the same updates (memory: the memory
  section's ``critics`` variant)

Budgets: default ``full``; ``--quick`` (CPU, under ~5 minutes); ``--tiny`` (seconds, for
tests: the figures mean nothing). Writes ``results.json``, ``summary.md`` and
``scaling.png`` to ``--out``. Exit code 1 if a numerics comparison fails, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SECTIONS = ("rollout", "update", "numerics", "memory", "scaling", "trepo", "critics")


DESCRIPTION = (
    "Benchmarks against model.generate, TRL's GRPOTrainer, and memory of PPO / GRPO / "
    "TRePO; prints a table of ratios."
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llm-mdp bench", description=DESCRIPTION)
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``llm-mdp bench`` (the CLI's subcommand parser calls this too)."""
    size = p.add_mutually_exclusive_group()
    size.add_argument(
        "--quick", action="store_true", help="smaller sizes and repeats (CPU, < ~5 min)"
    )
    size.add_argument("--tiny", action="store_true", help="a few seconds per section (tests)")
    p.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help=f"comma-separated sections among {','.join(SECTIONS)} (default: all)",
    )
    p.add_argument(
        "--out", type=Path, default=None, help="output folder (default: runs/bench-<time>)"
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="run the sections this many times; the table gives each ratio's median over "
        "the runs and its min-max (the run-to-run spread); default 1",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: peers compared on equal footing on a shared machine)",
    )


def run_bench(
    sections: Sequence[str],
    budget_name: str,
    device: str = "auto",
    threads: int = 1,
    log: Any = print,
    partial: Path | None = None,
) -> dict[str, Any]:
    """Run ``sections`` under a budget; returns everything measured (JSON-serialisable).

    With ``partial``, what has been measured so far is written there as JSON after each
    section (an interrupted run keeps its finished sections)."""
    from llm_mdp.bench.common import BUDGETS, quiet
    from llm_mdp.utils import resolve_device

    with quiet():
        return _run(sections, BUDGETS[budget_name], resolve_device(device), threads, log, partial)


def _run(
    sections: Sequence[str], b: Any, dev: Any, threads: int, log: Any, partial: Path | None
) -> dict[str, Any]:
    import torch

    from llm_mdp.bench.common import machine, versions

    torch.set_num_threads(threads)
    res: dict[str, Any] = {
        "budget": b.name,
        "machine": machine(dev),
        "versions": versions(),
        "sections": list(sections),
        "seconds": {},
    }
    trl_ok, trl_msg = (False, "not needed")
    if {"update", "numerics"} & set(sections) or ("scaling" in sections and b.scaling_trl):
        from llm_mdp.bench.vs_trl import trl_status

        trl_ok, trl_msg = trl_status()
        if not trl_ok:
            log(f"  TRL sections skipped: {trl_msg}")
    res["trl"] = {"available": trl_ok, "detail": trl_msg}

    for section in sections:
        t0 = time.perf_counter()
        log(f"[{section}]")
        if section == "rollout":
            from llm_mdp.bench.rollout import bench_rollout

            res["rollout"] = bench_rollout(
                b.rollout_vocabs,
                b.rollout_batches,
                new_tokens=b.rollout_new_tokens,
                model_size=b.rollout_model,
                device=dev,
                warmup=b.warmup,
                repeats=b.repeats,
                log=log,
            )
        elif section == "update":
            if trl_ok:
                from llm_mdp.bench.vs_trl import bench_update

                res["update"] = bench_update(
                    steps=b.update_steps,
                    seeds=b.update_seeds,
                    batch=b.update_batch,
                    group=b.update_group,
                    length=b.update_length,
                    model_size=b.update_model,
                    device=dev,
                    wide_vocab=b.update_wide_vocab,
                    wide_steps=b.update_wide_steps,
                    log=log,
                )
            else:
                res["update"] = {"skipped": trl_msg}
        elif section == "numerics":
            if trl_ok:
                from llm_mdp.bench.vs_trl_numerics import bench_numerics

                try:
                    res["numerics"] = bench_numerics(log=log)
                except Exception as exc:  # TRL's internals moved: say so, don't crash
                    res["numerics"] = {
                        "passed": False,
                        "error": f"{type(exc).__name__}: {exc}",
                        "rows": [],
                    }
                    log(f"  numerics could not call TRL's internals: {exc}")
            else:
                res["numerics"] = {"skipped": trl_msg}
        elif section == "memory":
            from llm_mdp.bench.memory import bench_memory

            res["memory"] = bench_memory(
                vocab=b.memory_vocab,
                model_size=b.memory_model,
                batch=b.memory_batch,
                length=b.memory_length,
                steps=b.memory_steps,
                device=dev,
                threads=threads,
                variants=b.memory_variants,
                log=log,
            )
        elif section == "scaling":
            from llm_mdp.bench.scaling import bench_scaling

            res["scaling"] = bench_scaling(
                batches=b.scaling_batches,
                lengths=b.scaling_lengths,
                fixed_batch=b.scaling_fixed_batch,
                fixed_length=b.scaling_fixed_length,
                group=b.update_group,
                model_size=b.update_model,
                steps=b.scaling_steps,
                device=dev,
                with_trl=trl_ok and b.scaling_trl,
                log=log,
            )
        elif section == "trepo":
            from llm_mdp.bench.trepo_cost import bench_trepo_cost

            res["trepo"] = bench_trepo_cost(
                num_envs=b.trepo_num_envs, steps=b.trepo_steps, device=dev, log=log
            )
        elif section == "critics":
            from llm_mdp.bench.critics import bench_critics

            res["critics"] = bench_critics(
                num_envs=b.critics_num_envs, updates=b.critics_updates, device=dev, log=log
            )
        res["seconds"][section] = time.perf_counter() - t0
        if partial is not None:
            partial.parent.mkdir(parents=True, exist_ok=True)
            partial.write_text(json.dumps(res, indent=2, default=str))
    return res


# ------------------------------------------------------------------------------ report
def _row(what: str, ours: str, peer: str, ratio: str, goal: str = "") -> list[str]:
    return [what, ours, peer, ratio, goal]


def _faster(peer_over_ours: float) -> str:
    if peer_over_ours >= 1:
        return f"{peer_over_ours:.2f}x faster"
    return f"{1 / peer_over_ours:.2f}x slower"


_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


def summary_rows(res: dict[str, Any]) -> list[list[str]]:
    """The ratio table: one row per figure, ``[what, ours, peer, ratio, goal]``.

    With repeated runs (``res["repeats"]``, from ``--repeats``) the figures are the first
    run's and the ratio cell adds the median and min-max of its leading number over all
    runs, e.g. ``1.08x faster [runs: 1.06 (1.02-1.08)]``.
    """
    rows = _rows_of_one_run(res)
    others = [_rows_of_one_run(r) for r in res.get("repeats", [])]
    if not others:
        return rows
    for i, row in enumerate(rows):
        values = [_NUMBER.search(row[3])]
        values += [
            _NUMBER.search(o[i][3]) if i < len(o) and o[i][0] == row[0] else None for o in others
        ]
        nums = [float(m.group()) for m in values if m is not None]
        if len(nums) == len(values) and len(nums) > 1:
            row[3] += f" [runs: {statistics.median(nums):.2f} ({min(nums):.2f}-{max(nums):.2f})]"
    return rows


def _rows_of_one_run(res: dict[str, Any]) -> list[list[str]]:
    rows: list[list[str]] = []
    for r in res.get("rollout", []):
        goal = ">= 2" if r["vocab"] >= 50000 else ">= 1.0"
        rows.append(
            _row(
                f"rollout tokens/s, vocab {r['vocab']}, batch {r['batch']}",
                f"{r['env_tok_s']:,.0f}",
                f"{r['generate_tok_s']:,.0f} (generate)",
                f"{r['env_over_generate']:.2f}x",
                goal,
            )
        )
    up = res.get("update")
    if up and "skipped" not in up:
        s = up["settings"]
        rows.append(
            _row(
                f"GRPO update s/step (B {s['batch']}, G {s['group']}, R {s['length']}, {s['model']})",
                f"{up['ours_step_s']:.3f}",
                f"{up['trl_step_s']:.3f} (TRL)",
                f"{up['trl_over_ours']:.2f}x faster"
                if up["trl_over_ours"] >= 1
                else f"{1 / up['trl_over_ours']:.2f}x slower",
                "faster",
            )
        )
        w = up.get("wide_vocab")
        if w:
            rows.append(
                _row(
                    f"GRPO update s/step, vocab {w['vocab']} (B {s['batch']}, R {s['length']}, {w['steps']} steps)",
                    f"{w['ours_step_s']:.3f}",
                    f"{w['trl_step_s']:.3f} (TRL)",
                    _faster(w["trl_over_ours"]),
                    "faster",
                )
            )
        rows.append(
            _row(
                f"mean batch reward over the {s['steps']} updates",
                f"{up['ours_mean_batch_reward']:.3f}",
                f"{up['trl_mean_batch_reward']:.3f} (TRL)",
                f"{up['ours_mean_batch_reward'] - up['trl_mean_batch_reward']:+.3f}",
                "same",
            )
        )
        rows.append(
            _row(
                f"reward after {s['steps']} updates ({len(s['seeds'])} seed(s), initial {up['initial_reward']:.3f})",
                f"{up['ours_final_reward']:.3f}",
                f"{up['trl_final_reward']:.3f} (TRL)",
                f"{up['ours_final_reward'] - up['trl_final_reward']:+.3f}",
                "same",
            )
        )
    elif up:
        rows.append(_row("GRPO update vs TRL", "-", "-", "skipped", up["skipped"]))
    nu = res.get("numerics")
    if nu and "skipped" not in nu:
        for r in nu["rows"]:
            rows.append(
                _row(
                    f"numerics loss_type={r['loss_type']} ({r['aggregation']})",
                    f"loss diff {r['loss_diff']:.1e}",
                    f"max grad diff {r['grad_max_abs_diff']:.1e}",
                    "PASS" if r["passed"] else "FAIL",
                    "<= 1e-5",
                )
            )
        if "error" in nu:
            rows.append(_row("numerics vs TRL", "-", "-", "ERROR", nu["error"][:60]))
    elif nu:
        rows.append(_row("numerics vs TRL", "-", "-", "skipped", nu["skipped"]))
    mem = res.get("memory")
    if mem:
        for r in mem["rows"]:
            if r["agent"] == "grpo":
                continue
            goal = "<= 1.1" if r["agent"] == "trepo" else ""
            cuda = f", cuda {r['cuda_ratio_to_grpo']:.2f}x" if "cuda_ratio_to_grpo" in r else ""
            name = {"ppo": "PPO", "trepo": "TRePO"}.get(r["agent"], r["agent"])
            rows.append(
                _row(
                    f"peak memory {name}/GRPO ({r['variant']})",
                    f"+{r['delta_mb']:.0f} MB",
                    f"+{r['grpo_delta_mb']:.0f} MB (GRPO)",
                    f"{r['ratio_to_grpo']:.2f}x{cuda}",
                    goal,
                )
            )
    if mem:
        dense = {r["agent"]: r for r in mem["rows"] if r["variant"] == "dense-head"}
        for r in mem["rows"]:
            if r["variant"] == "defaults" and r["agent"] in dense:
                d = dense[r["agent"]]
                rows.append(
                    _row(
                        f"peak memory {r['agent']}: chunked LM head / dense logits",
                        f"+{r['delta_mb']:.0f} MB",
                        f"+{d['delta_mb']:.0f} MB (dense)",
                        f"{r['delta_mb'] / d['delta_mb']:.2f}x",
                        "<= 0.5",
                    )
                )
    tr = res.get("trepo")
    if tr:
        g, t = tr["grpo"], tr["trepo"]
        rows.append(
            _row(
                f"TRePO/GRPO s/update (llm-mdp train defaults, B {tr['settings']['num_envs']})",
                f"{t['step_s']:.3f} (TRePO)",
                f"{g['step_s']:.3f} (GRPO)",
                f"{tr['ratio']:.2f}x ({tr['ratio_min']:.2f}-{tr['ratio_max']:.2f})",
                "<= 2.0",
            )
        )
        rows.append(
            _row(
                "positions encoded / decoded per update",
                f"{t['encoded_per_update']:,.0f} / {t['decoded_per_update']:,.0f}",
                f"{g['encoded_per_update']:,.0f} / {g['decoded_per_update']:,.0f}",
                f"{t['episodes_per_update']:,.0f} / {g['episodes_per_update']:,.0f} episodes",
            )
        )
    cr = res.get("critics")
    if cr:
        st, sets = cr["settings"], cr["setups"]
        for label, r in sets.items():
            rows.append(
                _row(
                    f"{label}: s/update, reward after {st['updates']} updates "
                    f"(train defaults, B {st['num_envs']})",
                    f"{r['step_s']:.3f} s, batch {r['final_batch_reward']:.3f}, "
                    f"greedy {r['greedy_reward']:.3f}",
                    f"{sets['trepo']['step_s']:.3f} s, {sets['trepo']['final_batch_reward']:.3f}"
                    " (TRePO)",
                    f"{r['time_over_grpo']:.2f}x GRPO time",
                )
            )
    sc = res.get("scaling")
    if sc:
        for axis in ("batch", "length"):
            pts = sc["curves"][axis]
            if len(pts) >= 2:
                a, z = pts[0], pts[-1]
                grow = z["ours_step_s"] / a["ours_step_s"]
                trl = ""
                if "trl_step_s" in z:
                    trl = f"{z['trl_step_s'] / a['trl_step_s']:.1f}x (TRL)"
                rows.append(
                    _row(
                        f"scaling: {axis} {a[axis]} -> {z[axis]}, time per update grows",
                        f"{grow:.1f}x",
                        trl or "-",
                        f"{_faster(z['trl_step_s'] / z['ours_step_s'])} at {axis} {z[axis]}"
                        if "trl_step_s" in z
                        else "-",
                    )
                )
    return rows


def format_table(rows: list[list[str]], markdown: bool = False) -> str:
    head = ["what", "ours", "peer", "ratio", "goal"]
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(out)
    widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=True)]
    line = "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))
    out = [line, "-" * len(line)]
    out += ["  ".join(x.ljust(w) for x, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def header(res: dict[str, Any]) -> str:
    m, v = res["machine"], res["versions"]
    return (
        f"budget {res['budget']}; {m['device']} ({m['cpu']}, {m['cores']} cores"
        + (f", {m['gpu']}" if "gpu" in m else "")
        + f"), torch threads {m['torch_threads']}; torch {v['torch']}, transformers "
        f"{v['transformers']}, trl {v['trl']}"
    )


def write_outputs(res: dict[str, Any], out: Path, command: str) -> list[Path]:
    """``results.json``, ``summary.md`` (and ``scaling.png`` when scaling ran)."""
    out.mkdir(parents=True, exist_ok=True)
    res = dict(res, command=command)
    paths = [out / "results.json"]
    paths[0].write_text(json.dumps(res, indent=2, default=str))
    md = [f"`{command}`", "", header(res), "", format_table(summary_rows(res), markdown=True)]
    if res.get("rollout"):
        from llm_mdp.bench.rollout import format_rollout

        md += ["", "```", format_rollout(res["rollout"]), "```"]
    if res.get("memory"):
        from llm_mdp.bench.memory import format_memory

        s = res["memory"]["settings"]
        md += [
            "",
            f"memory: {s['model']}, vocab {s['vocab']}, batch {s['batch']}, response cap "
            f"{s['length']}, {s['steps']} update(s), {s['device']}",
            "```",
            format_memory(res["memory"]),
            "```",
        ]
    (out / "summary.md").write_text("\n".join(md) + "\n")
    paths.append(out / "summary.md")
    if res.get("scaling"):
        try:
            from llm_mdp.bench.scaling import plot_scaling

            paths.append(plot_scaling(res["scaling"], out / "scaling.png"))
        except ImportError as exc:
            print(f"llm-mdp bench: no scaling.png ({exc})", file=sys.stderr)
    return paths


def bench_cli(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``llm-mdp bench ARGS``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_cli(_parser().parse_args(argv), argv)


def run_cli(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run ``llm-mdp bench`` with parsed ``args`` (``argv`` is recorded in the report)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown or not sections:
        print(
            f"llm-mdp bench: error: unknown section(s) {unknown}; known: {', '.join(SECTIONS)}",
            file=sys.stderr,
        )
        return 2
    if args.repeats < 1:
        print(f"llm-mdp bench: error: --repeats {args.repeats}, expected >= 1", file=sys.stderr)
        return 2
    if args.threads < 1:
        print(f"llm-mdp bench: error: --threads {args.threads}, expected >= 1", file=sys.stderr)
        return 2
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print(
                f"llm-mdp bench: error: --device {args.device}, but CUDA is not available "
                "(use --device cpu or auto)",
                file=sys.stderr,
            )
            return 2
    budget = "tiny" if args.tiny else "quick" if args.quick else "full"
    out = args.out or Path(f"runs/bench-{time.strftime('%Y%m%d-%H%M%S')}-{budget}")
    command = "llm-mdp bench " + " ".join(shlex.quote(a) for a in argv)
    runs: list[dict[str, Any]] = []
    for i in range(args.repeats):
        if i:
            print(f"--- repeat {i + 1} of {args.repeats}")
        partial = out / f"partial-{i + 1}.json"
        runs.append(run_bench(sections, budget, args.device, args.threads, partial=partial))
        partial.unlink(missing_ok=True)
    res = runs[0] if len(runs) == 1 else dict(runs[0], repeats=runs[1:])
    print()
    print(header(res))
    print(format_table(summary_rows(res)))
    if res.get("rollout"):
        from llm_mdp.bench.rollout import format_rollout

        print()
        print(format_rollout(res["rollout"]))
    if res.get("memory"):
        from llm_mdp.bench.memory import format_memory

        print()
        print(format_memory(res["memory"]))
    paths = write_outputs(res, out, command)
    total = sum(sum(r["seconds"].values()) for r in runs)
    print(f"\n{total:.0f} s; wrote " + ", ".join(str(p) for p in paths))
    nu = res.get("numerics") or {}
    return 1 if ("passed" in nu and not nu["passed"]) else 0


def main() -> None:  # python -m llm_mdp.bench.cli
    sys.exit(bench_cli())


if __name__ == "__main__":
    main()
