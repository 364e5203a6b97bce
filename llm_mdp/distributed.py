"""Data parallelism on PyTorch's own ``torch.distributed`` (launched with ``torchrun``).

Every rank holds a full policy replica and its own vector env with ``B / world_size``
rows. Per update each rank rolls out its shard of the *global* prompt list (sampled
identically on every rank from the shared seed), computes its loss normalized by the
*global* counts (sequences, tokens), and the gradients are summed with one all-reduce.
Groups stay whole on one rank. Sampling is counter-based per global row
(``llm_mdp.agents.rollout.counter_uniforms``), so an update does not depend on the world
size, and a checkpoint written at one world size resumes at another.

Backend: ``nccl`` when CUDA is available, else ``gloo``. Models too large for one device:
``AgentConfig(parallel="fsdp")`` shards them over the ranks (:mod:`llm_mdp.fsdp`).
"""

from __future__ import annotations

import os
from collections.abc import Collection
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only one that logs, plots and writes checkpoints."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In-place all-reduce (``sum``, ``max`` or ``min``); a no-op on one process."""
        if self.enabled:
            ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
            dist.all_reduce(tensor, op=ops[op])
        return tensor

    def reduce_metrics(
        self,
        m: dict[str, float],
        *,
        global_keys: Collection[str] = (),
        device: torch.device | None = None,
    ) -> dict[str, float]:
        """Combine per-rank metrics: ``global_keys`` (counters already summed over ranks)
        stay as they are, ``*/max`` and ``*/min`` take the extreme, ``time/*`` the slowest
        rank, the rest the mean over ranks. ``device``: where the collective runs (the
        backend's). A no-op on one process."""
        if not self.enabled:
            return m
        out = dict(m)
        groups: dict[str, list[str]] = {"max": [], "min": [], "sum": []}
        for k in m:
            if k in global_keys:
                continue
            op = (
                "max"
                if k.endswith("/max") or k.startswith("time/")
                else "min"
                if k.endswith("/min")
                else "sum"
            )
            groups[op].append(k)
        for op, keys in groups.items():
            if keys:
                v = torch.tensor([m[k] for k in keys], dtype=torch.float64, device=device)
                reduced = self.all_reduce(v, op).tolist()
                scale = self.world_size if op == "sum" else 1
                out |= {k: x / scale for k, x in zip(keys, reduced, strict=True)}
        return out

    def all_reduce_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Sum the gradients of ``params`` over ranks, flattened into one buffer."""
        if not self.enabled:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def context() -> DistContext:
    """The current job's context: from ``torch.distributed`` when it is initialized."""
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size())
    return DistContext()


def init_from_env(backend: str = "auto") -> DistContext:
    """Initialize the process group from ``torchrun``'s environment (no-op when absent).

    ``backend="auto"`` picks ``nccl`` on CUDA machines and ``gloo`` otherwise; each rank
    uses CUDA device ``LOCAL_RANK`` when CUDA is available. Under ``torchrun
    --nproc-per-node 1`` a group of one is made too (FSDP needs a process group).
    """
    if "WORLD_SIZE" not in os.environ or (dist.is_available() and dist.is_initialized()):
        return context()
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return context()
