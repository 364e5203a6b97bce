"""From checked options to an env, a policy and an agent configuration.

Every check that can fail on user input (agent and task names, task arguments, the
agent config, the batch against the group size, the device) runs in :func:`check`,
before a model is loaded or a file written; :func:`build` then only builds.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from typing import Any

from llm_mdp.cli.options import TINY_LR, TINY_MODELS, CLIError


def check_device(spec: str) -> None:
    """``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``, and available on this machine."""
    import torch

    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", spec):
        raise CLIError(f"--device {spec!r}: expected auto, cpu, cuda, cuda:N or mps")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise CLIError(f"--device {spec}: CUDA is not available here (use cpu or auto)")
        index = int(spec.split(":")[1]) if ":" in spec else 0
        if index >= torch.cuda.device_count():
            raise CLIError(
                f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    if spec == "mps" and not torch.backends.mps.is_available():
        raise CLIError("--device mps: MPS is not available here (use cpu or auto)")


def check_task_args(task: str, args: dict[str, Any]) -> dict[str, Any]:
    """``args`` against the task factory's signature: known names, annotated types."""
    from llm_mdp.tasks import task_factory
    from llm_mdp.validation import check_type, resolved_hints

    try:
        factory = task_factory(task)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    params = inspect.signature(factory).parameters
    hints = resolved_hints(getattr(factory, "func", factory))
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    out = {}
    for key, value in args.items():
        if (key not in params and not accepts_any) or key == "tokenizer":
            known = [k for k in params if k != "tokenizer"]
            raise CLIError(f"task {task!r}: unknown --task-arg {key!r}; known: {known}")
        try:
            out[key] = check_type(key, value, hints.get(key, Any))
        except TypeError as exc:
            raise CLIError(f"task {task!r}: --task-arg {exc}") from None
    return out


def agent_config(opts: dict[str, Any], world_size: int = 1) -> tuple[Any, Any]:
    """``(agent_class, config)`` from the options; the config is validated, and the
    per-process batch must be a multiple of its group size."""
    from llm_mdp.agents import get_agent

    try:
        agent_cls = get_agent(opts["agent"])
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    cls = agent_cls.config_class
    fields = {f.name for f in dataclasses.fields(cls)}
    cfg_args = dict(opts["agent_config"])
    unknown = sorted(set(cfg_args) - fields)
    if unknown:
        raise CLIError(f"unknown {cls.__name__} field(s) {unknown}; see `llm-mdp train --list`")
    cfg_args.setdefault("seed", opts["seed"])
    cfg_args.setdefault("parallel", opts["parallel"])
    lr = (
        opts["lr"]
        if opts["lr"] is not None
        else (TINY_LR if opts["model"] in TINY_MODELS else None)
    )
    if lr is not None:
        cfg_args.setdefault("learning_rate", lr)
    try:
        config = cls(**cfg_args)
    except (TypeError, ValueError) as exc:
        raise CLIError(f"{cls.__name__}: {exc}") from None
    if opts["num_envs"] % world_size:
        raise CLIError(
            f"--num-envs {opts['num_envs']}: expected a multiple of the world size {world_size}"
        )
    if (opts["num_envs"] // world_size) % config.group_size:
        raise CLIError(
            f"--num-envs {opts['num_envs']}: expected a multiple of {opts['agent']}'s "
            f"group_size={config.group_size} (per process)"
        )
    return agent_cls, config


def check(opts: dict[str, Any]) -> tuple[Any, Any]:
    """Every check on resolved options that needs no model; returns ``agent_config(opts)``."""
    check_device(opts["device"])
    opts["task_args"] = check_task_args(opts["task"], opts["task_args"])
    from llm_mdp.distributed import context

    return agent_config(opts, context().world_size)


def build(opts: dict[str, Any]) -> tuple[Any, Any, Any, Any]:
    """``(env, policy, agent_class, config)`` from checked options (see :func:`check`).

    Sets torch's thread count (``threads``), joins the ``torchrun`` process group when
    launched by it (each rank takes its shard of the batch), loads the model.
    """
    import torch

    from llm_mdp.distributed import init_from_env

    torch.set_num_threads(int(opts["threads"]))
    ctx = init_from_env()
    agent_cls, config = check(opts)
    from llm_mdp.envs import LLMTokenVectorEnv
    from llm_mdp.models import load_model
    from llm_mdp.policies import CausalLMPolicy, tiny_gpt2, tiny_llama
    from llm_mdp.tasks import make_task
    from llm_mdp.utils import resolve_device

    device = resolve_device(opts["device"])
    if ctx.enabled and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    model_name = str(opts["model"])
    model = tokenizer = None
    if model_name not in TINY_MODELS:
        try:
            model, tokenizer = load_model(model_name)
        except (OSError, ValueError, ImportError) as exc:
            raise CLIError(str(exc)) from None
    task_args = dict(opts["task_args"])
    if tokenizer is not None:
        task_args["tokenizer"] = tokenizer
    try:
        task = make_task(opts["task"], **task_args)
    except (TypeError, ValueError) as exc:
        raise CLIError(f"task {opts['task']!r}: {exc}") from None
    env = LLMTokenVectorEnv(task, opts["num_envs"] // ctx.world_size, device=device)
    if model is None:
        factory = tiny_gpt2 if model_name == "tiny-gpt2" else tiny_llama
        model = factory(
            env.vocab_size,
            seed=opts["seed"],
            pad_token_id=env.pad_token_id,
            eos_token_id=env.eos_token_id,
        )
    # an FSDP run leaves the model in host memory: sharding moves each block to the device
    policy = CausalLMPolicy(
        model,
        env.tokenizer,
        vocab_size=env.vocab_size,
        seed=opts["seed"],
        device=None if config.parallel == "fsdp" else device,
    )
    torch.manual_seed(opts["seed"])
    return env, policy, agent_cls, config
