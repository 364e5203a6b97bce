"""Run options: defaults < config file < flags, every value checked before any work.

The options of ``train``, ``compare`` and ``episode`` are one flat table
(:data:`DEFAULTS`); a config file (TOML, YAML, or the ``run.json`` a run writes) sets any
of them, flags override the file. Nothing here imports torch, so parsing and
``--help`` stay fast.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from llm_mdp.validation import Range, check_type

TINY_LR = 2e-3  # learning rate of the tiny random models unless --lr or learning_rate is set
TINY_MODELS = ("tiny-gpt2", "tiny-llama")
DEFAULT_THREADS = 1  # measured on a busy 2-core machine: see THREADS_HELP in llm_mdp.cli

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
    "threads": DEFAULT_THREADS,
    "parallel": "dp",
}
"""Every run option with its default (the keys of a config file and of ``run.json``)."""

TYPES: dict[str, Any] = {
    "agent": str,
    "task": str,
    "task_args": dict[str, Any],
    "model": str,
    "updates": int,
    "tokens": int | None,
    "num_envs": int,
    "seed": int,
    "device": str,
    "lr": float | None,
    "agent_config": dict[str, Any],
    "run_dir": str | None,
    "threads": int,
    "parallel": str,
}
RANGES: dict[str, Range] = {
    "updates": Range(1),
    "tokens": Range(1),
    "num_envs": Range(1),
    "seed": Range(0),
    "lr": Range(0, low_open=True),
    "threads": Range(1),
}
RECORD_ONLY = ("resumed",)
"""Keys ``run.json`` holds besides the options (ignored when it is read as ``--config``)."""

RESUME_SAFE = ("updates", "tokens", "threads")
"""Options that ``train --resume`` may change (with ``--no-progress``); any other option
given with ``--resume`` must equal the run's value."""


class CLIError(Exception):
    """A user error: printed as one line ``llm-mdp: error: ...``, exit code 2."""


# ---------------------------------------------------------------------------- flag types
def number_type(kind: type, rule: Range) -> Any:
    """An argparse ``type=`` that parses ``kind`` and checks ``rule``, naming both."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
            ) from None
        if not rule.contains(value):
            what = "an integer" if kind is int else "a finite number"
            raise argparse.ArgumentTypeError(f"expected {what} {rule.describe()}, got {text}")
        return value

    return parse


def key_value(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE read as JSON (``true``, ``3``, ``[1, 2]``, ``"x"``), else as
    a float (``nan``, ``inf``), else as a bare string."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        try:
            value = float(raw)
        except ValueError:
            value = raw
    return key.strip().replace("-", "_"), value


# ---------------------------------------------------------------------------- files
def read_options_file(path: Path, what: str = "config file") -> dict[str, Any]:
    """The options in a TOML, YAML or JSON file, each checked against :data:`TYPES`."""
    where = f"{what} {str(path)!r}"
    if not path.exists():
        raise CLIError(f"{where} does not exist")
    if path.is_dir():
        raise CLIError(f"{where} is a folder, expected a .toml, .yaml, .yml or .json file")
    if path.suffix not in (".toml", ".yaml", ".yml", ".json"):
        raise CLIError(f"{where}: expected a .toml, .yaml, .yml or .json file")
    try:
        text = path.read_text()
        if path.suffix == ".toml":
            import tomllib

            data: Any = tomllib.loads(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
    except Exception as exc:
        msg = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CLIError(f"cannot parse {where}: {msg}") from None
    if not isinstance(data, dict):
        raise CLIError(f"{where}: expected a table of options, got {type(data).__name__}")
    data = {str(k).replace("-", "_"): v for k, v in data.items() if k not in RECORD_ONLY}
    unknown = sorted(set(data) - set(DEFAULTS))
    if unknown:
        raise CLIError(f"{where}: unknown option(s) {unknown}; known: {sorted(DEFAULTS)}")
    try:
        return check_options(data)
    except (TypeError, ValueError) as exc:
        raise CLIError(f"{where}: {exc}") from None


def check_options(opts: dict[str, Any]) -> dict[str, Any]:
    """Type- and range-check option values (``TypeError`` / ``ValueError`` naming them)."""
    out = {}
    for key, value in opts.items():
        value = check_type(key, value, TYPES[key])
        if key in RANGES:
            RANGES[key].check(key, value)
        out[key] = value
    return out


# ---------------------------------------------------------------------------- resolving
def given_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options set on the command line (flags left out are ``None``)."""
    out = {k: getattr(args, k, None) for k in DEFAULTS if k not in ("task_args", "agent_config")}
    out = {k: v for k, v in out.items() if v is not None}
    if isinstance(out.get("run_dir"), Path):
        out["run_dir"] = str(out["run_dir"])
    for key in ("task_args", "agent_config"):
        if getattr(args, key, None):
            out[key] = dict(getattr(args, key))
    return out


def resolve_options(args: argparse.Namespace) -> dict[str, Any]:
    """Defaults < config file < command-line flags, checked.

    The default task's arguments apply to the default task only. ``--lr`` and
    ``--seed`` given as flags beat ``learning_rate`` and ``seed`` in the file's
    ``agent_config`` (so a ``run.json`` read as ``--config`` can be varied with flags);
    ``--lr`` together with ``--set learning_rate=...`` is an error.
    """
    opts = {k: (dict(v) if isinstance(v, dict) else v) for k, v in DEFAULTS.items()}
    config = getattr(args, "config", None)
    file_opts = read_options_file(config) if config is not None else {}
    flags = given_options(args)
    opts |= {k: v for k, v in (file_opts | flags).items() if k not in ("task_args", "agent_config")}
    task_args = dict(DEFAULTS["task_args"]) if opts["task"] == DEFAULTS["task"] else {}
    opts["task_args"] = task_args | file_opts.get("task_args", {}) | flags.get("task_args", {})
    agent_config = file_opts.get("agent_config", {}) | flags.get("agent_config", {})
    for flag, field in (("lr", "learning_rate"), ("seed", "seed")):
        if flag in flags:
            if field in flags.get("agent_config", {}):
                raise CLIError(
                    f"--{flag} {flags[flag]} and --set {field}={flags['agent_config'][field]}: "
                    "give one of them"
                )
            agent_config.pop(field, None)
    opts["agent_config"] = agent_config
    return opts


def resume_conflicts(flags: dict[str, Any], record: dict[str, Any]) -> list[str]:
    """The flags given with ``--resume`` that differ from the run's ``record`` (run.json)."""
    effective_lr = record.get("agent_config", {}).get("learning_rate", record.get("lr"))
    out = []
    for key, value in flags.items():
        if key in RESUME_SAFE:
            continue
        flag = "--" + key.replace("_", "-")
        if key in ("task_args", "agent_config"):
            have = record.get(key, {})
            flag = "--task-arg" if key == "task_args" else "--set"
            out += [
                f"{flag} {k}={v!r} (the run has {have.get(k)!r})"
                for k, v in value.items()
                if have.get(k) != v
            ]
            continue
        have = effective_lr if key == "lr" else record.get(key)
        if key == "run_dir" and have is not None and Path(have).resolve() == Path(value).resolve():
            continue
        if have != value:
            out.append(f"{flag} {value} (the run has {have!r})")
    return out


# ---------------------------------------------------------------------------- run folders
RUN_FILES = ("run.json", "metrics.csv", "checkpoint.pt", "checkpoint")
"""Files whose presence means a folder holds a run."""
OUTPUT_FILES = (*RUN_FILES, "curve.png", "samples_before.txt", "samples_after.txt")


def check_writable_dir(path: Path, flag: str) -> None:
    """``path`` is (or can be created as) a folder this process can write in."""
    if path.exists() and not path.is_dir():
        raise CLIError(f"{flag} {str(path)!r} exists and is not a folder")
    _check_parent(path, path, flag)


def check_writable_file(path: Path, flag: str) -> None:
    """``path`` is a file this process can create or replace (checked before the work)."""
    if path.is_dir():
        raise CLIError(f"{flag} {str(path)!r} is a folder, expected a file path")
    if path.exists() and not os.access(path, os.W_OK):
        raise CLIError(f"{flag} {str(path)!r}: the file is not writable")
    _check_parent(path.parent, path, flag)


def _check_parent(folder: Path, shown: Path, flag: str) -> None:
    """The nearest existing ancestor of ``folder`` is a folder we may write in."""
    parent = folder
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise CLIError(f"{flag} {str(shown)!r}: {str(parent)!r} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CLIError(
            f"{flag} {str(shown)!r}: cannot write in {str(parent)!r} (permission denied)"
        )


def checkpoint_path(run_dir: Path) -> Path:
    """The run's checkpoint: the sharded folder ``checkpoint/`` of an FSDP run, else the
    single file ``checkpoint.pt``."""
    sharded = run_dir / "checkpoint"
    return sharded if sharded.is_dir() else run_dir / "checkpoint.pt"


def held_run_files(path: Path) -> list[str]:
    """The :data:`RUN_FILES` present in ``path``."""
    return [name for name in RUN_FILES if (path / name).exists()]


def clear_run(path: Path) -> None:
    """Remove a run's outputs from ``path`` (``--overwrite``); other files stay."""
    import shutil

    for name in OUTPUT_FILES:
        if (path / name).is_dir():  # a sharded (FSDP) checkpoint
            shutil.rmtree(path / name)
        else:
            (path / name).unlink(missing_ok=True)
    shutil.rmtree(path / "tb", ignore_errors=True)
