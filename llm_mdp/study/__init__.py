"""Studies: a grid of (agent variant) x task x seed runs at equal generated-token budgets,
resumable, with bootstrap intervals over seeds, pairwise tests and figures.

``llm-mdp study main`` runs the built-in main study; ``llm-mdp study --list`` lists the
built-in ones (``<name>.toml`` files in this package). See ``docs/experiments.md``.
"""

from llm_mdp.study.runner import run_one, run_study
from llm_mdp.study.spec import RunSpec, StudyError, StudySpec, builtin_studies, load_study

__all__ = [
    "RunSpec",
    "StudyError",
    "StudySpec",
    "builtin_studies",
    "load_study",
    "run_one",
    "run_study",
]
