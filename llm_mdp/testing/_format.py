"""Failure messages: name a gradient coordinate, list the worst ones, describe the MDP."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from llm_mdp.policies import TabularPolicy
from llm_mdp.theory import ExactModel

SHOW = 5  # coordinates listed in a failure message


def coordinate_namer(model: ExactModel) -> Callable[[int], str]:
    """``index -> "name[i, j]"`` over the flattened trainable parameters of ``model``.

    For a :class:`~llm_mdp.policies.TabularPolicy` the logit's state and token are added,
    named by the MDP's tokenizer (:meth:`~llm_mdp.theory.tables.ExactTables.token_name`),
    e.g. ``logits[1, 3] (state 'a' + 'a', token 'b')``.
    """
    spans: list[tuple[int, str, tuple[int, ...]]] = []
    offset = 0
    for param_name, p in model.policy.named_parameters():
        if p.requires_grad:
            spans.append((offset, param_name, tuple(p.shape)))
            offset += p.numel()
    policy = model.policy
    nodes = policy.nodes() if isinstance(policy, TabularPolicy) else None

    def name(index: int) -> str:
        for start, pname, shape in reversed(spans):
            if index >= start:
                local = index - start
                idx = []
                for size in reversed(shape):
                    idx.append(local % size)
                    local //= size
                idx.reverse()
                out = f"{pname}[{', '.join(map(str, idx))}]" if idx else pname
                if nodes is not None and pname == "logits" and len(idx) == 2:
                    prompt, prefix = nodes[idx[0]]
                    out += (
                        f" (state {model.text(prompt)!r} + {model.text(prefix)!r}, "
                        f"token {model.token_name(idx[1])!r})"
                    )
                return out
        return f"#{index}"

    return name


def describe_mdp(model: ExactModel) -> str:
    kind = type(model.policy).__name__
    if hasattr(model.policy, "model"):
        kind = type(model.policy.model).__name__
    rewards = "response-level rewards (ZRA)" if model.zra else "per-token rewards"
    return (
        f"{kind} policy ({model.num_params} parameters), {model.tree.num_responses} responses, "
        f"{rewards}, gamma={model.gamma:g}"
    )


def fmt(x: float) -> str:
    if not math.isfinite(x):
        return str(x)
    return f"{x:.6g}" if x == 0 or 1e-4 <= abs(x) < 1e6 else f"{x:.4e}"


def worst_coordinates(
    estimate: Tensor,
    target: Tensor,
    allowed: Tensor,
    namer: Callable[[int], str],
    *,
    target_label: str = "exact",
    estimate_label: str = "estimate",
) -> tuple[int, list[str]]:
    """``(number outside the tolerance, lines for the worst few)``."""
    diff = estimate - target
    excess = diff.abs() - allowed
    bad = excess > 0
    order = torch.argsort(excess, descending=True)[: min(SHOW, int(bad.sum()))]
    lines = []
    for k in order.tolist():
        lines.append(
            f"    {namer(k)}: {target_label} {fmt(float(target[k]))}, {estimate_label} "
            f"{fmt(float(estimate[k]))} (diff {float(diff[k]):+.3e})"
        )
    return int(bad.sum()), lines
