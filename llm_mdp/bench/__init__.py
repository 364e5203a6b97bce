"""Benchmarks against the tools people use: ``llm-mdp bench``.

* rollout: tokens/s of env + policy vs ``model.generate`` (:mod:`llm_mdp.bench.rollout`)
* update, numerics: our GRPO vs TRL's ``GRPOTrainer`` (:mod:`llm_mdp.bench.vs_trl`)
* memory: peak memory of PPO, GRPO, TRePO updates (:mod:`llm_mdp.bench.memory`)
* scaling: time per update vs batch and response length (:mod:`llm_mdp.bench.scaling`)

Peers run side by side in one process (memory: one fresh process per agent) and the
report gives ratios; see ``benchmarks/README.md`` for the latest figures.
"""

from llm_mdp.bench.cli import SECTIONS, bench_cli, run_bench

__all__ = ["SECTIONS", "bench_cli", "run_bench"]
