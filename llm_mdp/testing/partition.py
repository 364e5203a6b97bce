"""Micro-batching / data parallelism: a loss must not depend on how its batch is split.

Gradient accumulation and data-parallel training compute the loss of every part of a
batch separately and sum the gradients. That equals the gradient of the whole batch's
loss only when every part is normalized by the *whole* batch's counts (sequences,
tokens, the length cap), as :func:`llm_mdp.estimators.aggregate` documents and the
agents do (``Agent.accumulate_gradients``). :func:`assert_partition_invariant` checks it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ._format import fmt

__all__ = ["LossFn", "assert_partition_invariant", "batch_counts"]

LossFn = Callable[[Mapping[str, Tensor], Mapping[str, float]], Tensor]
"""``loss_fn(micro_batch, counts) -> scalar``; ``counts`` are the whole batch's
``{"num_sequences", "num_tokens", "max_len"}``, ready for ``aggregate(x, mask, mode, **counts)``."""

Splits = int | Sequence[int] | Sequence[Sequence[int]]


def batch_counts(mask: Tensor) -> dict[str, float]:
    """``{"num_sequences": B, "num_tokens": mask.sum(), "max_len": R}`` of a ``(B, R)`` mask."""
    return {
        "num_sequences": float(mask.shape[0]),
        "num_tokens": float(mask.bool().sum()),
        "max_len": float(mask.shape[1]),
    }


def _partition(spec: Splits, b: int, group_size: int) -> list[list[int]]:
    """Row index lists from a number of parts, a list of sizes or a list of index lists."""
    n_groups = b // group_size
    if isinstance(spec, int):
        if not 1 <= spec <= n_groups:
            raise ValueError(f"splits={spec} must be in 1..{n_groups} (groups of {group_size})")
        bounds = [round(i * n_groups / spec) for i in range(spec + 1)]
        return [
            list(range(bounds[i] * group_size, bounds[i + 1] * group_size)) for i in range(spec)
        ]
    items: list[Any] = list(spec)
    if items and all(isinstance(x, int) for x in items):
        sizes = [int(x) for x in items]
        if sum(sizes) != b or any(s < 1 or s % group_size for s in sizes):
            raise ValueError(
                f"split sizes {sizes} must be positive multiples of group_size={group_size} "
                f"summing to the batch size {b}"
            )
        out, lo = [], 0
        for s in sizes:
            out.append(list(range(lo, lo + s)))
            lo += s
        return out
    parts = [[int(i) for i in part] for part in items]
    flat = sorted(i for part in parts for i in part)
    if flat != list(range(b)) or any(not part for part in parts):
        raise ValueError(f"split index lists must partition the rows 0..{b - 1}, got {parts}")
    return parts


def _default_partitions(b: int, group_size: int) -> list[list[list[int]]]:
    n = b // group_size
    specs: list[Splits] = [2] if n >= 2 else []
    if n >= 3:
        specs.append([group_size, b - group_size])  # uneven: local normalization shows
        specs.append(n)  # one group per part
    return [_partition(s, b, group_size) for s in specs]


def _select(batch: Mapping[str, Any], rows: list[int], b: int) -> dict[str, Any]:
    idx = torch.tensor(rows, dtype=torch.long)
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, Tensor) and value.dim() >= 1 and value.shape[0] == b:
            out[key] = value.index_select(0, idx.to(value.device))
        else:
            out[key] = value
    return out


def _grads(loss: Tensor, leaves: list[Tensor], label: str) -> list[Tensor]:
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise TypeError(f"loss_fn must return a scalar tensor, got {shape} ({label})")
    if not loss.requires_grad:
        raise ValueError(f"loss_fn's loss does not depend on the tensors checked ({label})")
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves, strict=True)]


def assert_partition_invariant(
    loss_fn: LossFn,
    batch: Mapping[str, Any],
    *,
    splits: Splits | None = None,
    counts: Mapping[str, float] | None = None,
    mask_key: str = "mask",
    group_size: int = 1,
    wrt: Sequence[str] | None = None,
    params: Iterable[Tensor] | None = None,
    rtol: float = 1e-6,
    atol: float = 1e-10,
) -> None:
    """Assert that the batch's loss gradient equals the sum over micro-batches (global counts).

    Checks ``grad loss_fn(batch, counts) = sum_k grad loss_fn(batch[part_k], counts)`` (and the
    same for the loss values), where ``counts`` are the *whole* batch's counts.

    Args:
        loss_fn: ``loss_fn(micro_batch, counts) -> scalar`` (:data:`LossFn`): the
            micro-batch's share of the batch loss; ``counts`` has ``num_sequences``,
            ``num_tokens`` and ``max_len`` of the whole batch (:func:`batch_counts`).
        batch: a dict of tensors; those with ``B`` rows are split, the rest passed as is.
            :func:`~llm_mdp.testing.loss_batch` makes one.
        splits: the partition: a number of contiguous parts (``2``), a list of part sizes
            (``[1, 7]``) or a list of row-index lists (``[[0, 2], [1, 3]]``). Default: three
            partitions in turn: halves, an uneven one (one group, the rest) and one group
            per part.
        counts: the whole batch's counts (default :func:`batch_counts` of ``batch[mask_key]``).
        group_size: parts keep contiguous groups of this size whole (for losses that use
            group statistics).
        wrt: keys of ``batch`` to differentiate (default: the tensors with
            ``requires_grad``, else ``"logp"``).
        params: differentiate w.r.t. these instead (e.g. ``model.parameters()`` when
            ``loss_fn`` runs a model on ``batch``).

    On failure the message shows, per part, by what factor its gradient differs, and a HINT
    when the factor is the global count over the part's own (``num_tokens`` or
    ``num_sequences``): the loss was normalized per micro-batch instead of globally.
    """
    if mask_key not in batch:
        raise KeyError(f"batch has no {mask_key!r} (the response mask); pass mask_key=")
    mask = batch[mask_key]
    b = int(mask.shape[0])
    if group_size < 1 or b % group_size:
        raise ValueError(f"group_size={group_size} must divide the batch size {b}")
    glob = dict(counts) if counts is not None else batch_counts(mask)
    partitions = (
        _default_partitions(b, group_size)
        if splits is None
        else [_partition(splits, b, group_size)]
    )

    per_row = params is None
    if per_row:
        keys = (
            list(wrt)
            if wrt is not None
            else [k for k, v in batch.items() if isinstance(v, Tensor) and v.requires_grad]
        )
        if not keys and "logp" in batch:
            keys = ["logp"]
        if not keys:
            raise ValueError("nothing to differentiate: pass wrt=[keys] or params=")
        base = dict(batch)
        leaves = []
        for k in keys:
            leaf = batch[k].detach().clone().requires_grad_(True)
            base[k] = leaf
            leaves.append(leaf)
    else:
        base = dict(batch)
        leaves = [p for p in params if p.requires_grad]  # type: ignore[union-attr]
        keys = [f"param {i}" for i in range(len(leaves))]

    full_loss = loss_fn(base, glob)
    full = _grads(full_loss, leaves, "whole batch")
    for parts in partitions:
        part_losses, part_grads = [], []
        for rows in parts:
            part_loss = loss_fn(_select(base, rows, b), glob)
            part_losses.append(part_loss)
            part_grads.append(_grads(part_loss, leaves, f"rows {rows}"))
        summed = [sum(gs[i] for gs in part_grads) for i in range(len(leaves))]
        loss_sum = float(sum(float(x.detach()) for x in part_losses))
        bad = []
        for key, f, s in zip(keys, full, summed, strict=True):
            assert isinstance(s, Tensor)
            if not torch.isfinite(f).all() or not torch.isfinite(s).all():
                bad.append(f"{key}: non-finite gradient (does the loss read padding?)")
                continue
            err = (f - s).abs() - (atol + rtol * f.abs())
            if bool((err > 0).any()):
                j = int(err.flatten().argmax())
                where = [int(i) for i in torch.unravel_index(torch.tensor(j), f.shape)]
                bad.append(
                    f"{key}: max |whole - sum of parts| {float((f - s).abs().max()):.3e}; "
                    f"worst at {key}{where} (whole {fmt(float(f.flatten()[j]))}, "
                    f"sum of parts {fmt(float(s.flatten()[j]))})"
                )
        if not bad:
            continue
        msg = [
            f"assert_partition_invariant failed for {getattr(loss_fn, '__name__', loss_fn)} "
            f"with parts of sizes {[len(p) for p in parts]} (rows {parts})",
            f"  loss: whole batch {fmt(float(full_loss.detach()))}, sum of parts {fmt(loss_sum)}",
            *[f"  {line}" for line in bad],
        ]
        msg += _factor_lines(parts, full, part_grads, mask, glob, per_row)
        msg += _counts_hint(loss_fn, base, parts[0], leaves, glob, b)
        raise AssertionError("\n".join(msg))


def _ratio(part: Tensor, whole: Tensor) -> float | None:
    denom = float((whole * whole).sum())
    if denom <= 0:
        return None
    return float((part * whole).sum()) / denom


def _factor_lines(
    parts: list[list[int]],
    full: list[Tensor],
    part_grads: list[list[Tensor]],
    mask: Tensor,
    glob: Mapping[str, float],
    per_row: bool,
) -> list[str]:
    """Per part: the factor between its gradient and the whole batch's on its rows."""
    if not per_row:
        return []
    lines, hints = [], []
    factors: list[tuple[float, float, float]] = []
    for rows, grads in zip(parts, part_grads, strict=True):
        idx = torch.tensor(rows, dtype=torch.long)
        part = torch.cat([g.index_select(0, idx.to(g.device)).flatten() for g in grads])
        whole = torch.cat([g.index_select(0, idx.to(g.device)).flatten() for g in full])
        r = _ratio(part, whole)
        if r is None:
            continue
        m = mask.index_select(0, idx.to(mask.device)).bool()
        tok = float(glob["num_tokens"]) / max(float(m.sum()), 1.0)
        seq = float(glob["num_sequences"]) / len(rows)
        factors.append((r, tok, seq))
        lines.append(
            f"  part of {len(rows)} rows ({int(m.sum())} tokens): its gradient is {r:.6g} x the "
            f"whole batch's on its rows (global/own tokens {tok:.4g}, sequences {seq:.4g})"
        )
    failing = [f for f in factors if abs(f[0] - 1) > 1e-6]
    if failing:
        n = len(factors)

        def match(which: int, avg: bool) -> bool:
            return all(
                abs(f[0] - (f[which] / (n if avg else 1))) <= 1e-6 * max(1.0, f[which])
                for f in failing
            )

        what = None
        if match(1, False):
            what = "by the micro-batch's own token count instead of counts['num_tokens']"
        elif match(2, False):
            what = "by the micro-batch's own number of sequences instead of counts['num_sequences']"
        elif match(1, True):
            what = "by its own token count and then averaged over micro-batches"
        elif match(2, True):
            what = "by its own number of sequences and then averaged over micro-batches"
        if what:
            which = "each part was" if len(failing) == n else f"{len(failing)} of {n} parts were"
            hints.append(
                f"  HINT: loss normalized per micro-batch instead of globally: {which} divided "
                f"{what}; pass the global counts, e.g. aggregate(x, mask, mode, **counts)"
            )
        elif len(failing) == n and max(f[0] for f in failing) - min(f[0] for f in failing) <= 1e-6:
            hints.append(
                f"  HINT: every part is scaled by the same {failing[0][0]:.6g}: divided by the "
                "number of micro-batches (gradient accumulation averaged instead of summed)?"
            )
    return lines + hints


def _counts_hint(
    loss_fn: LossFn,
    base: Mapping[str, Any],
    rows: list[int],
    leaves: list[Tensor],
    glob: Mapping[str, float],
    b: int,
) -> list[str]:
    """Does the loss ignore ``counts``? (The same gradient with doubled counts.)"""
    doubled = {k: 2.0 * float(v) for k, v in glob.items()}
    try:
        g1 = _grads(loss_fn(_select(base, rows, b), glob), leaves, "probe")
        g2 = _grads(loss_fn(_select(base, rows, b), doubled), leaves, "probe")
    except Exception:  # the loss may reject other counts; this is only a hint
        return []
    if all(torch.allclose(x, y, rtol=1e-9, atol=0.0) for x, y in zip(g1, g2, strict=True)) and any(
        bool(x.abs().max() > 0) for x in g1
    ):
        return [
            "  HINT: the loss ignores the counts it is given (doubling them changes nothing): "
            "it normalizes by the micro-batch's own sizes"
        ]
    return []
