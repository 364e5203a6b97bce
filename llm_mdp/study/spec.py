"""A study file: a TOML description of a grid of (agent variant) x task x seed runs.

Every run of a study stops at the same budget of *generated tokens* (every token any
rollout produced: TRePO's value rollouts and ReMax's greedy baseline included), so the
agents are compared at equal sampling cost. Example (the built-in ``tiny`` study)::

    name = "tiny"
    description = "two agents, one task, two seeds, a few hundred tokens"
    tasks = ["reverse"]
    seeds = [0, 1]
    budget = 600            # generated tokens per run
    num_envs = 8            # rollout batch (episodes per update)

    [task_args.reverse]
    partial = true

    [agents.grpo]            # a label; ``agent`` defaults to the label
    config = { group_size = 4 }

    [agents.trepo_m1]        # a variant: any agent config field
    agent = "trepo"
    config = { num_anchors = 1, group_size = 4 }

    [tune]                   # learning rates picked on a seed that is not reported
    seed = 100
    learning_rates = [1e-3, 3e-3]

An agent whose ``config`` sets ``learning_rate`` is not tuned. Without ``[tune]`` every
agent needs one (or takes the tiny models' default, 2e-3, when ``lr`` is unset).
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from llm_mdp.cli.options import TINY_LR, TINY_MODELS

__all__ = ["BUILTIN", "RunSpec", "StudySpec", "builtin_studies", "load_study"]

BUILTIN = "llm_mdp.study"  # package holding the built-in ``<name>.toml`` studies


class StudyError(ValueError):
    """A study file is missing, unreadable or describes an impossible grid."""


@dataclass(frozen=True)
class RunSpec:
    """One run of a study: everything that determines its result.

    Attributes:
        label: the agent variant's label in the study (``dr_grpo``).
        agent: the registered agent name (``grpo``).
        task: built-in task name; ``task_args`` its factory arguments.
        seed: seed of everything.
        config: agent config overrides (``learning_rate`` included once resolved).
        budget: generated tokens at which the run stops.
        num_envs: episodes per update; ``model`` the model name.
        phase: ``"tune"`` (learning-rate search, not reported) or ``"main"``.
    """

    label: str
    agent: str
    task: str
    task_args: dict[str, Any]
    seed: int
    config: dict[str, Any]
    budget: int
    num_envs: int
    model: str
    phase: str = "main"

    @property
    def key(self) -> str:
        """File stem of the run's results, unique within a study."""
        if self.phase == "tune":
            lr = self.config["learning_rate"]
            return f"tune--{self.label}--{self.task}--lr{lr:g}--s{self.seed}"
        return f"{self.label}--{self.task}--s{self.seed}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class StudySpec:
    """A parsed study file (see the module docstring for the format).

    Attributes:
        name, description: what the study is.
        tasks: task names; ``task_args`` per task.
        seeds: reported seeds.
        budget: generated tokens per run.
        num_envs, model, threads: as for ``llm-mdp train``.
        agents: label -> ``{"agent": name, "config": overrides}``.
        tune_seed, tune_learning_rates, tune_tasks: the learning-rate search (empty
            ``tune_learning_rates``: none).
        tune_extend: times a label's grid is extended by one rate past an edge when its
            best rate lies on that edge (the grid's outer ratio again: ``[1e-3, 3e-3,
            1e-2]`` with the best at ``1e-2`` tries ``3.3e-2``).
        points: points of each learning curve on the token axis.
        final_fraction: the final reward is the mean over this last fraction of the budget.
    """

    name: str
    description: str
    tasks: list[str]
    seeds: list[int]
    budget: int
    agents: dict[str, dict[str, Any]]
    num_envs: int = 64
    model: str = "tiny-gpt2"
    threads: int = 1
    task_args: dict[str, dict[str, Any]] = field(default_factory=dict)
    tune_seed: int = 100
    tune_learning_rates: list[float] = field(default_factory=list)
    tune_tasks: list[str] = field(default_factory=list)
    tune_extend: int = 1
    points: int = 20
    final_fraction: float = 0.1

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str) -> StudySpec:
        """Parse and check a study table; ``where`` names it in errors."""
        known = {
            "name", "description", "tasks", "seeds", "budget", "num_envs", "model",
            "threads", "task_args", "agents", "tune", "points", "final_fraction",
        }  # fmt: skip
        unknown = sorted(set(d) - known)
        if unknown:
            raise StudyError(f"{where}: unknown key(s) {unknown}; expected some of {sorted(known)}")
        for key in ("tasks", "seeds", "budget", "agents"):
            if key not in d:
                raise StudyError(f"{where}: missing {key!r}")
        agents: dict[str, dict[str, Any]] = {}
        for label, a in d["agents"].items():
            if not isinstance(a, dict) or set(a) - {"agent", "config"}:
                raise StudyError(
                    f"{where}: [agents.{label}] may hold 'agent' and 'config' only, got {a!r}"
                )
            agents[label] = {"agent": a.get("agent", label), "config": dict(a.get("config", {}))}
        tune = dict(d.get("tune", {}))
        if set(tune) - {"seed", "learning_rates", "tasks", "extend"}:
            raise StudyError(
                f"{where}: [tune] holds seed, learning_rates, tasks, extend; got {tune!r}"
            )
        spec = cls(
            name=str(d.get("name", Path(where).stem)),
            description=str(d.get("description", "")),
            tasks=list(d["tasks"]),
            seeds=[int(s) for s in d["seeds"]],
            budget=int(d["budget"]),
            agents=agents,
            num_envs=int(d.get("num_envs", 64)),
            model=str(d.get("model", "tiny-gpt2")),
            threads=int(d.get("threads", 1)),
            task_args={k: dict(v) for k, v in d.get("task_args", {}).items()},
            tune_seed=int(tune.get("seed", 100)),
            tune_learning_rates=[float(x) for x in tune.get("learning_rates", [])],
            tune_tasks=list(tune.get("tasks", d["tasks"])),
            tune_extend=int(tune.get("extend", 1)),
            points=int(d.get("points", 20)),
            final_fraction=float(d.get("final_fraction", 0.1)),
        )
        spec.check(where)
        return spec

    def check(self, where: str) -> None:
        """Grid-level checks that need no model: names, ranges, the tuning seed."""
        from llm_mdp.agents import AGENTS
        from llm_mdp.tasks import TASKS

        for t in self.tasks + self.tune_tasks:
            if t not in TASKS:
                raise StudyError(f"{where}: unknown task {t!r}; known: {', '.join(sorted(TASKS))}")
        for t in self.task_args:
            if t not in self.tasks:
                raise StudyError(f"{where}: [task_args.{t}] names a task not in tasks")
        for label, a in self.agents.items():
            if a["agent"] not in AGENTS:
                raise StudyError(
                    f"{where}: [agents.{label}] agent {a['agent']!r}; known: {', '.join(AGENTS)}"
                )
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise StudyError(f"{where}: seeds={self.seeds}: expected distinct seeds")
        if self.tune_learning_rates and self.tune_seed in self.seeds:
            raise StudyError(
                f"{where}: tune seed {self.tune_seed} is a reported seed; tune on another one"
            )
        if self.budget < 1 or self.num_envs < 1 or self.points < 1:
            raise StudyError(f"{where}: budget, num_envs and points must be >= 1")
        if not 0 < self.final_fraction <= 1:
            raise StudyError(f"{where}: final_fraction={self.final_fraction}: expected (0, 1]")

    # ------------------------------------------------------------------ the grid
    def tuned(self, label: str) -> bool:
        """Whether ``label``'s learning rate is searched (none set in its config)."""
        return (
            bool(self.tune_learning_rates) and "learning_rate" not in self.agents[label]["config"]
        )

    def run_spec(self, label: str, task: str, seed: int, lr: float | None, phase: str) -> RunSpec:
        """One run of ``label`` on ``task`` with ``seed`` at learning rate ``lr`` (``None``:
        the label's own, or the tiny models' default)."""
        a = self.agents[label]
        config = dict(a["config"])
        if lr is not None:
            config["learning_rate"] = lr
        elif "learning_rate" not in config and self.model in TINY_MODELS:
            config["learning_rate"] = TINY_LR
        return RunSpec(
            label=label,
            agent=a["agent"],
            task=task,
            task_args=dict(self.task_args.get(task, {})),
            seed=seed,
            config=config,
            budget=self.budget,
            num_envs=self.num_envs,
            model=self.model,
            phase=phase,
        )

    def tune_runs(self) -> list[RunSpec]:
        """The learning-rate search: each tuned label x tune task x rate, on the tune seed."""
        return [
            self.run_spec(label, task, self.tune_seed, lr, "tune")
            for label in self.agents
            if self.tuned(label)
            for task in self.tune_tasks
            for lr in self.tune_learning_rates
        ]

    def main_runs(self, learning_rates: dict[str, float]) -> list[RunSpec]:
        """The reported grid with each tuned label's picked rate, seed by seed (a study
        stopped early has every agent on the same seeds)."""
        return [
            self.run_spec(label, task, seed, learning_rates.get(label), "main")
            for seed in self.seeds
            for task in self.tasks
            for label in self.agents
        ]


def builtin_studies() -> dict[str, Path]:
    """Name -> path of every built-in study (``<name>.toml`` in this package)."""
    root = resources.files(BUILTIN)
    return {
        Path(p.name).stem: Path(str(p))
        for p in root.iterdir()
        if p.name.endswith(".toml") and p.is_file()
    }


def load_study(name_or_path: str | Path) -> tuple[StudySpec, Path]:
    """A built-in study by name, or a study file; returns the spec and the file."""
    builtins = builtin_studies()
    path = builtins.get(str(name_or_path), Path(name_or_path))
    if not path.is_file():
        raise StudyError(
            f"study {str(name_or_path)!r}: not a built-in study ({', '.join(sorted(builtins))}) "
            "nor a file"
        )
    try:
        d = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise StudyError(f"{path}: {exc}") from None
    return StudySpec.from_dict(d, str(path)), path
