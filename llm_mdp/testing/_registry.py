"""Run a user's plain function through the exact toolkit, which looks estimators up by name.

The toolkit (:class:`~llm_mdp.theory.ExactModel`, :class:`~llm_mdp.theory.KLModel`)
evaluates registered estimators. A function passed to :mod:`llm_mdp.testing` is put in the
registry under a unique private name for the duration of one check and removed after,
so nothing leaks into :data:`~llm_mdp.estimators.ADVANTAGE_ESTIMATORS` or
:data:`~llm_mdp.estimators.KL_ESTIMATORS`.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from llm_mdp import estimators as est
from llm_mdp.estimators import AdvantageInputs

_COUNTER = itertools.count()


def display_name(fn: Any) -> str:
    """A readable name for a registry key, a function, a ``functools.partial`` or a callable."""
    if isinstance(fn, str):
        return fn
    if isinstance(fn, functools.partial):
        opts = ", ".join(f"{k}={v!r}" for k, v in fn.keywords.items())
        return f"{display_name(fn.func)}({opts})" if opts else display_name(fn.func)
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    return str(name) if name else type(fn).__name__


def _checked_advantages(fn: Callable[..., Any], label: str) -> Callable[..., Tensor]:
    @functools.wraps(fn)
    def run(batch: AdvantageInputs, **options: Any) -> Tensor:
        with torch.no_grad():
            out = fn(batch, **options)
        if isinstance(out, tuple):
            raise TypeError(
                f"advantage estimator {label} returned a tuple; it must return the (B, R) "
                "advantages only (a verl-style function returns (advantages, returns): "
                "wrap it and return the first)"
            )
        if not isinstance(out, Tensor):
            raise TypeError(
                f"advantage estimator {label} returned {type(out).__name__}, expected a "
                "(B, R) torch.Tensor"
            )
        b, r = batch.mask.shape
        if out.dim() == 1 and out.shape[0] == b:
            raise ValueError(
                f"advantage estimator {label} returned one value per response, shape ({b},); "
                "it must return per-token weights (B, R): broadcast with "
                "adv[:, None] * batch.mask"
            )
        return out.detach()

    return run


@contextlib.contextmanager
def registered_advantage(estimator: str | Callable[..., Any]) -> Iterator[str]:
    """Yield a registry key for ``estimator`` (itself when it already is one)."""
    if isinstance(estimator, str):
        est.get_advantage_estimator(estimator)  # clear error for an unknown name
        yield estimator
        return
    if not callable(estimator):
        raise TypeError(
            f"estimator must be a registry name or a function fn(batch, **options), "
            f"got {type(estimator).__name__}"
        )
    label = display_name(estimator)
    key = f"llm_mdp.testing:{label}#{next(_COUNTER)}"
    est.ADVANTAGE_ESTIMATORS[key] = _checked_advantages(estimator, label)
    try:
        yield key
    finally:
        est.ADVANTAGE_ESTIMATORS.pop(key, None)


def _differentiable_kl(fn: Callable[..., Any]) -> Callable[..., Tensor]:
    """The toolkit differentiates the estimate w.r.t. ``logp``; an estimate detached from
    it (e.g. ``logp`` and ``ref_logp`` swapped into a function that detaches its second
    argument) has gradient 0 and is still checked for its value."""

    @functools.wraps(fn)
    def run(logp: Tensor, ref_logp: Tensor, mask: Tensor | None = None) -> Tensor:
        out = fn(logp, ref_logp, mask)
        if not isinstance(out, Tensor):
            raise TypeError(f"KL estimator returned {type(out).__name__}, expected a Tensor")
        if logp.requires_grad and not out.requires_grad:
            out = out + 0.0 * logp
        return out

    return run


@contextlib.contextmanager
def registered_kl(estimator: str | Callable[..., Any]) -> Iterator[str]:
    """Yield a KL-registry key for ``estimator`` (itself when it already is one)."""
    if isinstance(estimator, str):
        est.get_kl_estimator(estimator)
        yield estimator
        return
    if not callable(estimator):
        raise TypeError(
            f"kl_fn must be a registry name or a function fn(logp, ref_logp, mask=None), "
            f"got {type(estimator).__name__}"
        )
    key = f"llm_mdp.testing:{display_name(estimator)}#{next(_COUNTER)}"
    est.KL_ESTIMATORS[key] = _differentiable_kl(estimator)
    try:
        yield key
    finally:
        est.KL_ESTIMATORS.pop(key, None)
