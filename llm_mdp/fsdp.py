"""Fully sharded data parallel (PyTorch's FSDP2, ``fully_shard``) for models that do not
fit one device, with sharded checkpoints (``torch.distributed.checkpoint``).

``AgentConfig(parallel="fsdp")`` (CLI ``--parallel fsdp``) keeps the data-parallel
algorithm of :mod:`llm_mdp.distributed` -- each rank rolls out its slice of the global
batch, losses are normalized by global counts, so an update equals one process on the
whole batch -- but no rank holds a whole model at rest. The policy, the frozen reference
and PPO's critic are each wrapped with ``fully_shard`` per transformer block (the
model's ``_no_split_modules`` classes) and then at the root; parameters, gradients and
AdamW state become ``DTensor`` shards over the ranks (1/world size each).

What runs where:

- **Training forwards/backwards** (log-probs, the critic, the reference's log-probs)
  all-gather one block at a time and free it after use; gradients are reduce-*scattered*
  with FSDP's divide factor set to 1, i.e. *summed*, which is exactly the data-parallel
  all-reduce (our losses already carry the global normalization).
- **Rollouts** (KV-cached decoding, TRePO's value rollouts, ``evaluate``) run inside
  :func:`gathered`: the policy's shards are all-gathered *once*, decoding runs with no
  collective at all, then the full weights are freed. Ranks may take different numbers of
  decoding steps and value rollouts, so per-layer all-gathers (which every rank must
  issue in the same order) cannot be used there, and one gather per rollout phase is
  also far cheaper than one per layer per token. Peak memory during rollouts is
  therefore one full copy of the policy's weights plus the KV cache; see
  ``docs/distributed.md``.
- **Checkpoints**: every rank writes its own shards into ``run_dir/checkpoint/``
  (``torch.distributed.checkpoint``), which can be loaded at any world size, sharded or
  not (:func:`load_checkpoint`).

Mixed precision (``mixed_precision=True``): FSDP's ``MixedPrecisionPolicy(param_dtype=
bfloat16, reduce_dtype=float32)``. Shards, gradients' reduction and AdamW state stay
float32; forwards and backwards run on bfloat16 copies. Log-probs then carry bfloat16
rounding (about 3 significant digits): the update is no longer equal to the float32 one
to 1e-5, only close, and the importance ratio of the first epoch is 1 only up to that
rounding. The exact toolkit (``llm_mdp.theory``) should stay in float32.
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from llm_mdp.agents.base import Agent

PARALLEL_MODES = ("dp", "fsdp")
META_FILE = "agent.pt"  # the non-tensor part of a sharded checkpoint (counters, RNG, config)

__all__ = [
    "PARALLEL_MODES",
    "device_mesh",
    "gathered",
    "grad_norm",
    "is_sharded",
    "load_checkpoint",
    "local_state_bytes",
    "read_meta",
    "save_checkpoint",
    "shard_agent",
    "shard_module",
]


def _fsdp() -> Any:
    from torch.distributed import fsdp

    return fsdp


def is_sharded(module: object) -> bool:
    """Whether ``module`` (or, for a policy, its ``model``) was wrapped by ``fully_shard``."""
    return isinstance(module, nn.Module) and isinstance(_forward_root(module), _fsdp().FSDPModule)


def _forward_root(module: nn.Module) -> nn.Module:
    """The module whose ``forward`` is called: a policy's ``model`` (its methods call the
    HF model directly), else the module itself (PPO's ``ValueModel``)."""
    from llm_mdp.policies import CausalLMPolicy

    if isinstance(module, CausalLMPolicy):
        return module.model
    return module


def _blocks(root: nn.Module) -> list[nn.Module]:
    """Transformer blocks: instances of the ``_no_split_modules`` classes that HF models
    declare (``GPT2Block``, ``LlamaDecoderLayer`` ...), outermost first."""
    names: set[str] = set()
    for m in root.modules():
        names.update(getattr(m, "_no_split_modules", None) or ())
    return [m for m in root.modules() if type(m).__name__ in names]


def device_mesh(module: nn.Module) -> Any:
    """The 1-D mesh of all ranks that shards live on: ``cuda`` (this rank's current device)
    under ``nccl``, else the device type ``module`` is on (``cpu`` under ``gloo``)."""
    from torch.distributed.device_mesh import init_device_mesh

    if not _distributed():
        raise RuntimeError(
            "parallel='fsdp' needs an initialized torch.distributed process group "
            "(launch with torchrun, or call llm_mdp.distributed.init_from_env()); "
            "use parallel='dp' in a single process"
        )
    kind = "cuda" if dist.get_backend() == "nccl" else next(module.parameters()).device.type
    return init_device_mesh(kind, (dist.get_world_size(),))


def shard_module(
    module: nn.Module, *, mixed_precision: bool = False, frozen: bool = False, mesh: Any = None
) -> nn.Module:
    """``fully_shard`` each transformer block of ``module``, then its forward root.

    Args:
        module: a :class:`~llm_mdp.policies.CausalLMPolicy` (its ``model`` is sharded) or
            any module whose ``forward`` is called (PPO's critic). It may still be on the
            CPU: each block is moved to the mesh's device as it is sharded, so a model
            larger than one GPU never sits whole on one. A model without
            ``_no_split_modules`` is sharded as one unit at the root (correct, but the
            whole model is gathered at once).
        mixed_precision: bfloat16 compute, float32 reductions (see the module docstring).
        frozen: a module that never trains (the reference): its root reshards after
            forward too, so no full copy stays alive between calls.
        mesh: the device mesh (default: :func:`device_mesh`).

    Gradients are *summed* over ranks (divide factor 1), like
    :meth:`llm_mdp.distributed.DistContext.all_reduce_grads`. Returns ``module``.
    """
    fsdp = _fsdp()
    root = _forward_root(module)
    kwargs: dict[str, Any] = {"mesh": mesh if mesh is not None else device_mesh(root)}
    if mixed_precision:
        kwargs["mp_policy"] = fsdp.MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32
        )
    for block in _blocks(root):
        fsdp.fully_shard(block, **kwargs)
    # None: FSDP's default (the root keeps its weights from forward to backward)
    fsdp.fully_shard(root, reshard_after_forward=True if frozen else None, **kwargs)
    if not frozen:
        for m in root.modules():
            if isinstance(m, fsdp.FSDPModule):
                m.set_gradient_divide_factor(1.0)
                m.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no PREMUL_SUM
    return module


def shard_agent(agent: Agent) -> None:
    """Shard every model of ``agent`` in place (before its optimizer is built): the
    trainable ``agent.modules`` (policy, PPO's critic) and the frozen reference."""
    mp = bool(getattr(agent.config, "mixed_precision", False))
    mesh = device_mesh(agent.modules["policy"])
    for m in agent.modules.values():
        shard_module(m, mixed_precision=mp, mesh=mesh)
    if agent.ref_policy is not None:
        ref = agent._as_module(agent.ref_policy)
        shard_module(ref, mixed_precision=mp, frozen=True, mesh=mesh)


@contextmanager
def _gather(root: nn.Module) -> Iterator[None]:
    fsdp = _fsdp()
    units = [m for m in root.modules() if isinstance(m, fsdp.FSDPModule)]
    for u in units:  # collective: every rank enters rollouts at the same point
        u.unshard()
    for u in units:
        u.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for u in units:
            u.set_reshard_after_forward(u is not root, recurse=False)  # FSDP's defaults
            u.reshard()


def gathered(policy: object) -> AbstractContextManager[None]:
    """Context for rollouts: all-gather a sharded policy once, decode with no collective
    (ranks may take different numbers of steps), free the full weights on exit.

    A no-op context for a policy that is not sharded. Entering it is collective: every
    rank must enter it together (``Agent.train_step`` and ``Agent.evaluate`` do).
    """
    if not isinstance(policy, nn.Module) or not is_sharded(policy):
        return nullcontext()
    return _gather(_forward_root(policy))


def grad_norm(norm: torch.Tensor) -> float:
    """The global gradient norm as a float (``clip_grad_norm_`` returns a DTensor on
    sharded parameters)."""
    full = getattr(norm, "full_tensor", None)
    return float(full() if callable(full) else norm)


def local_state_bytes(agent: Agent) -> dict[str, int]:
    """Bytes of the storage this rank allocates for the trainable parameters and the
    optimizer state (its local shards, FSDP's padding included, when sharded):
    ``{"parameters": ..., "optimizer": ...}``. Shared storage (tied weights) counts once."""

    def nbytes(tensors: list[torch.Tensor]) -> int:
        storages = {}
        for t in tensors:
            to_local = getattr(t, "to_local", None)
            st = (to_local() if callable(to_local) else t).untyped_storage()
            storages[st.data_ptr()] = st.nbytes()
        return sum(storages.values())

    params = [p for g in agent.optimizer.param_groups for p in g["params"]]
    state = [v for st in agent.optimizer.state.values() for v in st.values()]
    return {
        "parameters": nbytes(params),
        "optimizer": nbytes([v for v in state if isinstance(v, torch.Tensor)]),
    }


# ---------------------------------------------------------------------------- checkpoints
def _tensor_state(agent: Agent) -> tuple[nn.Module, dict[str, Any]]:
    """The tensors of a checkpoint, keyed by fully qualified names so that
    ``torch.distributed.checkpoint`` can reshard them to any world size."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    container = nn.ModuleDict(agent.modules)
    model_sd, optim_sd = get_state_dict(container, agent.optimizer)
    state: dict[str, Any] = {"modules": model_sd, "optimizer": optim_sd}
    if agent.ref_policy is not None:
        state["ref_policy"] = agent._as_module(agent.ref_policy).state_dict()
    return container, state


def save_checkpoint(agent: Agent, path: str | os.PathLike[str]) -> Path:
    """Write a sharded checkpoint folder: each rank its shards, rank 0 the rest.

    Collective: every rank calls it. The folder is written as ``PATH.tmp`` and renamed
    by rank 0, so a crash never leaves a half-written ``PATH`` (the folder must be on a
    file system every rank sees).
    """
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    ctx = agent.dist
    if ctx.is_main and tmp.exists():
        shutil.rmtree(tmp)
    _barrier()
    _, state = _tensor_state(agent)
    dcp.save(state, checkpoint_id=tmp)
    if ctx.is_main:
        meta = agent.state_dict()
        for k in ("modules", "ref_policy", "optimizer"):
            meta.pop(k)
        meta["format"] = "dcp-1"
        torch.save(meta, tmp / META_FILE)
        old = path.with_name(path.name + ".old")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return path


def read_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The non-tensor part of a sharded checkpoint (config, counters, history, RNG)."""
    meta_path = Path(path) / META_FILE
    if not meta_path.exists():
        raise FileNotFoundError(f"{str(path)!r} is not a sharded checkpoint: no {META_FILE}")
    meta: dict[str, Any] = torch.load(meta_path, map_location="cpu", weights_only=False)
    return meta


def load_checkpoint(agent: Agent, path: str | os.PathLike[str]) -> None:
    """Load a sharded checkpoint into ``agent``, at any world size, sharded or not:
    weights, reference, optimizer state, then counters and RNG."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    meta = read_meta(path)
    container, state = _tensor_state(agent)
    if agent.ref_policy is None:
        state.pop("ref_policy", None)
    with warnings.catch_warnings():  # one process, no group: DCP warns it assumes so
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.load(state, checkpoint_id=Path(path), no_dist=not _distributed())
    set_state_dict(
        container,
        agent.optimizer,
        model_state_dict=state["modules"],
        optim_state_dict=state["optimizer"],
    )
    if "ref_policy" in state:
        agent._as_module(agent.ref_policy).load_state_dict(state["ref_policy"])
    agent.load_state_dict(meta)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _distributed():
        dist.barrier()
