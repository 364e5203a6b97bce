"""Counter-based random streams: uniforms that are pure functions of ``(stream, position)``.

A stream id hashes a key such as ``(seed, update, kind, global row)``; the uniform that
draws the token at response position ``c`` is a hash of ``(stream id, c)`` (SplitMix64's
finalizer on int64 tensors). So an episode's draws depend on its key only -- not on the
batch it runs in, the order of rows, the world size, or how value rollouts are chunked.
"""

from __future__ import annotations

import torch

__all__ = ["counter_uniforms", "stream_ids"]

_MASK64 = (1 << 64) - 1


def _signed(x: int) -> int:
    x &= _MASK64
    return x - (1 << 64) if x >= 1 << 63 else x


_C1, _C2, _GOLDEN = (
    _signed(0xBF58476D1CE4E5B9),
    _signed(0x94D049BB133111EB),
    _signed(0x9E3779B97F4A7C15),
)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finalizer on int64 tensors (wrapping multiply, logical shifts)."""
    x = x ^ ((x >> 30) & ((1 << 34) - 1))
    x = x * _C1
    x = x ^ ((x >> 27) & ((1 << 37) - 1))
    x = x * _C2
    return x ^ ((x >> 31) & ((1 << 33) - 1))


def stream_ids(*key: int, rows: torch.Tensor) -> torch.Tensor:
    """Stream ids ``(len(rows),)`` int64 for ``rows`` under a tuple of integer ``key`` parts
    (e.g. ``(seed, update, kind)``): distinct keys give independent streams."""
    h = torch.zeros((), dtype=torch.long, device=rows.device)
    for part in key:
        h = _mix(h ^ _signed(int(part) * 0x9E3779B97F4A7C15 + 1))
    return _mix(h ^ rows.long())


def counter_uniforms(streams: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``(B,)`` float64 uniforms in ``[0, 1)``, a pure function of ``(stream, position)``."""
    x = _mix(streams ^ _mix(positions.long() * _GOLDEN + 1))
    return ((x >> 11) & ((1 << 53) - 1)).double() / float(1 << 53)
