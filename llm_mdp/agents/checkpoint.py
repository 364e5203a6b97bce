"""Reading agent checkpoints back, with errors that name the file and what is wrong.

A checkpoint (``Agent.save``) is a ``torch.save`` dict of plain containers and tensors
(weights, optimizer, counters, RNG states, metrics history), so it is read with
``weights_only=True``: loading one never runs code from the file.
"""

from __future__ import annotations

import dataclasses
import os
import random
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "agent_state",
    "check_matches",
    "load_agent",
    "read_checkpoint",
    "restore_agent",
    "save_agent",
]

CHECKPOINT_FORMAT = 1
"""Version of the checkpoint layout written by ``Agent.state_dict``."""

_KEYS = ("agent", "config", "modules", "optimizer", "counters", "history", "rng", "extra")
_COUNTERS = ("update", "samples", "tokens", "episodes")
_COST_COUNTERS = ("generated_tokens", "forward_positions")  # 0 in older checkpoints


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, or belongs to another agent or task."""


def read_checkpoint(
    path: str | os.PathLike[str], *, map_location: str | torch.device | None = "cpu"
) -> dict[str, Any]:
    """Load and sanity-check ``path``; :class:`CheckpointError` names the file and the problem.

    Checks that the file exists and is not empty, that torch can read it (a truncated
    or corrupt file fails here), and that it is an llm-mdp agent checkpoint of the
    current format with non-negative integer counters.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint {str(p)!r} does not exist")
    if not p.is_file():
        raise CheckpointError(f"checkpoint {str(p)!r} is not a file")
    if p.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {str(p)!r} is empty (0 bytes)")
    try:
        state = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        raise CheckpointError(
            f"checkpoint {str(p)!r} cannot be read (truncated or not a torch file): {first}"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(
            f"checkpoint {str(p)!r} holds a {type(state).__name__}, expected an llm-mdp "
            "agent checkpoint (a dict written by Agent.save)"
        )
    if state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"checkpoint {str(p)!r} has format {state.get('format')!r}, expected "
            f"{CHECKPOINT_FORMAT} (an llm-mdp agent checkpoint written by Agent.save)"
        )
    missing = [k for k in _KEYS if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {str(p)!r} lacks the key(s) {missing}")
    counters = state["counters"]
    bad = [
        k
        for k in _COUNTERS
        if not isinstance(counters, dict)
        or not isinstance(counters.get(k), int)
        or isinstance(counters.get(k), bool)
        or counters[k] < 0
    ]
    if bad:
        raise CheckpointError(
            f"checkpoint {str(p)!r}: counter(s) {bad} missing or not non-negative integers"
        )
    return state


def check_matches(
    state: dict[str, Any], path: str | os.PathLike[str], *, agent: str, task: str, vocab_size: int
) -> None:
    """Raise :class:`CheckpointError` when ``state`` was written for another agent, task
    or vocabulary than the one loading it."""
    where = f"checkpoint {str(path)!r}"
    if state["agent"] != agent:
        raise CheckpointError(f"{where} is for agent {state['agent']!r}, not {agent!r}")
    if "task" in state and state["task"] != task:
        raise CheckpointError(f"{where} is for task {state['task']!r}, not {task!r}")
    if "vocab_size" in state and state["vocab_size"] != vocab_size:
        raise CheckpointError(
            f"{where} has a vocabulary of {state['vocab_size']} tokens, the env {vocab_size}"
        )


def save_agent(agent: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``agent.state_dict()`` atomically (temp file + rename): never a half-written
    file. Under FSDP a sharded folder, written by every rank (``llm_mdp.fsdp``)."""
    if agent.config.parallel == "fsdp":
        from llm_mdp import fsdp

        return fsdp.save_checkpoint(agent, path)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(agent.state_dict(), tmp)
    os.replace(tmp, path)
    return path


def load_agent(
    cls: Any,
    path: str | os.PathLike[str],
    env: Any,
    policy: Any,
    *,
    run_dir: str | os.PathLike[str] | None = None,
    parallel: str | None = None,
) -> Any:
    """``cls.load``: read and check ``path``, build ``cls(env, policy, config)``, restore it.

    ``path`` is a single-file checkpoint or a sharded one (a folder written under FSDP,
    :mod:`llm_mdp.fsdp`); ``parallel`` overrides the saved ``"dp"`` / ``"fsdp"`` mode.

    Raises:
        CheckpointError: the file is unreadable or not a checkpoint, belongs to another
            agent, task or vocabulary, or its weights do not fit ``policy``'s model.
    """
    from llm_mdp import fsdp

    sharded = Path(path).is_dir()
    if sharded:
        try:
            state = fsdp.read_meta(path)
        except Exception as exc:
            raise CheckpointError(f"checkpoint {str(path)!r} cannot be read: {exc}") from None
    else:
        state = read_checkpoint(path, map_location=policy.device)
    check_matches(state, path, agent=cls.name, task=env.task.name, vocab_size=env.vocab_size)
    try:
        config = cls.config_class.from_dict(state["config"])
        if parallel == "fsdp" and not sharded:
            raise ValueError("a single-file checkpoint loads with parallel='dp'")
        if parallel is not None:
            mp = config.mixed_precision and parallel == "fsdp"
            config = dataclasses.replace(config, parallel=parallel, mixed_precision=mp)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {str(path)!r}: bad config: {exc}") from None
    agent = cls(env, policy, config, run_dir=run_dir)
    if sharded:
        fsdp.load_checkpoint(agent, path)
        return agent
    try:
        agent.load_state_dict(state)
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not fit this {cls.name} agent's model: {first}"
        ) from None
    return agent


def agent_state(agent: Any) -> dict[str, Any]:
    """``Agent.state_dict``: weights, optimizer, counters, metrics history, every RNG state
    and the agent's own extra state, as plain containers and tensors."""
    gen = getattr(agent.policy, "generator", None)
    return {
        "format": CHECKPOINT_FORMAT,
        "agent": agent.name,
        "task": agent.env.task.name,
        "vocab_size": agent.env.vocab_size,
        "config": dataclasses.asdict(agent.config),
        "modules": {k: m.state_dict() for k, m in agent.modules.items()},
        "ref_policy": None
        if agent.ref_policy is None
        else agent._as_module(agent.ref_policy).state_dict(),
        "optimizer": agent.optimizer.state_dict(),
        "counters": {k: getattr(agent, k) for k in _COUNTERS + _COST_COUNTERS},
        "history": agent.history,
        "rng": {
            "agent": agent.rng.bit_generator.state,
            "policy": None if gen is None else gen.get_state(),
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
        },
        "extra": agent.extra_state(),
    }


def restore_agent(agent: Any, state: dict[str, Any]) -> None:
    """``Agent.load_state_dict``: the inverse of :func:`agent_state`. A sharded
    checkpoint's tensors are loaded by ``llm_mdp.fsdp.load_checkpoint``; its ``state``
    (the metadata) has no ``"modules"``."""
    if state.get("agent") != agent.name:
        raise ValueError(f"checkpoint is for agent {state.get('agent')!r}, not {agent.name!r}")
    if "modules" in state:
        for k, m in agent.modules.items():
            m.load_state_dict(state["modules"][k])
        if agent.ref_policy is not None and state["ref_policy"] is not None:
            agent._as_module(agent.ref_policy).load_state_dict(state["ref_policy"])
        agent.optimizer.load_state_dict(state["optimizer"])
    for k in _COUNTERS:
        setattr(agent, k, state["counters"][k])
    for k in _COST_COUNTERS:
        setattr(agent, k, int(state["counters"].get(k, 0)))
    agent.history = list(state["history"])
    agent.rng.bit_generator.state = state["rng"]["agent"]
    gen = getattr(agent.policy, "generator", None)
    if gen is not None and state["rng"]["policy"] is not None:
        gen.set_state(state["rng"]["policy"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    agent.load_extra_state(state["extra"])
