"""pytest plugin of llm-mdp: small exact MDPs as fixtures (entry point ``pytest11``).

Installed with the package, so any project whose environment has ``llm-mdp`` gets these
fixtures without a ``conftest.py``:

``exact_mdp``
    the paper's tabular set-up (:func:`~llm_mdp.testing.small_mdp` defaults: 15
    responses, random per-token rewards, gamma 1, seed 0). Parametrize it indirectly with
    a kind or a dict of :func:`~llm_mdp.testing.small_mdp` arguments::

        @pytest.mark.parametrize("exact_mdp", ["tabular", {"kind": "gpt2", "zra": True}],
                                 indirect=True)
        def test_mine(exact_mdp): ...

``tabular_mdp``, ``transformer_mdp``, ``zra_mdp``
    the same with a tabular policy, a tiny GPT-2 (``"llama"`` by parametrizing with it),
    and response-level rewards only (ZRA, tabular). Each takes the same indirect parameters.
``each_mdp``
    runs the test once per MDP of :data:`EACH_MDP` (tabular per-token, tabular ZRA binary,
    tiny GPT-2 per-token, tiny Llama ZRA).
``small_mdp_factory``
    ``small_mdp_factory(**kwargs)``: a cached :func:`~llm_mdp.testing.small_mdp`.
``random_loss_batch``
    a fresh :func:`~llm_mdp.testing.loss_batch` (8 rows, groups of 2, seed 0) for
    :func:`~llm_mdp.testing.assert_partition_invariant`.

MDPs are built on first use, once per session, and shared: treat them as read-only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pytest

__all__ = ["EACH_MDP"]

EACH_MDP: dict[str, dict[str, Any]] = {
    "tabular": {"kind": "tabular"},
    "tabular-zra-binary": {"kind": "tabular", "zra": True, "binary_rewards": True},
    "gpt2": {"kind": "gpt2"},
    "llama-zra": {"kind": "llama", "zra": True},
}

_CACHE: dict[tuple[tuple[str, Any], ...], Any] = {}


def _build(**kwargs: Any) -> Any:
    import inspect

    from llm_mdp.testing.mdps import small_mdp

    bound = inspect.signature(small_mdp).bind(**kwargs)
    bound.apply_defaults()  # one cache entry per MDP, however its arguments were spelled
    key = tuple(sorted(bound.arguments.items()))
    if key not in _CACHE:
        _CACHE[key] = small_mdp(**kwargs)
    return _CACHE[key]


def _mdp(request: pytest.FixtureRequest, **defaults: Any) -> Any:
    param = getattr(request, "param", None)
    if param is None:
        return _build(**defaults)
    if isinstance(param, str):
        return _build(**{**defaults, "kind": param})
    if isinstance(param, Mapping):
        return _build(**{**defaults, **param})
    raise TypeError(
        f"{request.fixturename} takes a kind ('tabular', 'gpt2', 'llama') or a dict of "
        f"small_mdp arguments as its indirect parameter, got {param!r}"
    )


@pytest.fixture(scope="session")
def small_mdp_factory() -> Callable[..., Any]:
    """``small_mdp_factory(**kwargs)``: :func:`llm_mdp.testing.small_mdp`, cached per session."""
    return _build


@pytest.fixture(scope="session")
def exact_mdp(request: pytest.FixtureRequest) -> Any:
    """The paper's tabular MDP (per-token rewards, gamma 1, seed 0); parametrize indirectly."""
    return _mdp(request)


@pytest.fixture(scope="session")
def tabular_mdp(request: pytest.FixtureRequest) -> Any:
    """A tabular-policy MDP (per-token rewards by default); parametrize with a dict."""
    return _mdp(request, kind="tabular")


@pytest.fixture(scope="session")
def transformer_mdp(request: pytest.FixtureRequest) -> Any:
    """A one-layer GPT-2 policy MDP; parametrize with ``"llama"`` or a dict."""
    return _mdp(request, kind="gpt2")


@pytest.fixture(scope="session")
def zra_mdp(request: pytest.FixtureRequest) -> Any:
    """Response-level rewards only (the Zero-Reward Assumption holds), tabular policy."""
    return _mdp(request, zra=True)


@pytest.fixture(scope="session", params=list(EACH_MDP.values()), ids=list(EACH_MDP))
def each_mdp(request: pytest.FixtureRequest) -> Any:
    """Every MDP of :data:`EACH_MDP` in turn."""
    return _build(**request.param)


@pytest.fixture
def random_loss_batch() -> dict[str, Any]:
    """A fresh :func:`llm_mdp.testing.loss_batch` (8 rows, groups of 2, seed 0)."""
    from llm_mdp.testing.mdps import loss_batch

    return loss_batch(8, 6, group_size=2, seed=0)
