"""GSPO, CISPO and TRL's importance-sampling correction: loss and gradient equal TRL's own."""

from __future__ import annotations

import importlib.util
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llm_mdp.bench.vs_trl import trl_status

TRL_OK, TRL_WHY = trl_status() if importlib.util.find_spec("trl") else (False, "trl not installed")
pytestmark = pytest.mark.skipif(not TRL_OK, reason=f"needs trl (pip install trl): {TRL_WHY}")


@pytest.fixture(scope="module")
def setup() -> Iterator[dict[str, Any]]:
    from llm_mdp.bench.common import quiet, text_task
    from llm_mdp.bench.vs_trl import save_model

    tt = text_task(6, n_prompts=4, seed=0)
    with tempfile.TemporaryDirectory() as tmp, quiet():
        folder = Path(tmp) / "model"
        save_model(folder, tt, (1, 32), 0, max_positions=len(tt.prompts[0]) + 14)
        yield {"folder": folder, "tt": tt, "group": 4, "length": 6}


@pytest.mark.slow
def test_offpolicy_losses_and_corrections_equal_trl(setup: dict[str, Any]) -> None:
    from llm_mdp.bench.common import quiet
    from llm_mdp.bench.vs_trl_offpolicy import IS_CAP, OFFPOLICY_ROWS, compare_offpolicy_rows

    with quiet():
        rows = compare_offpolicy_rows(**setup)
    assert [r["loss_type"] for r in rows] == list(OFFPOLICY_ROWS)
    for r in rows:
        assert r["loss_diff"] <= 1e-6 and r["grad_max_abs_diff"] <= 1e-6, r
        assert r["grad_max_abs"] > 1e-3, r  # a real gradient
        assert r["advantage_max_abs"] > 0.1, r  # from the policy loss, not the KL alone
    by = {r["loss_type"]: r for r in rows}
    assert 0 < by["gspo"]["clipped_tokens"] < by["gspo"]["tokens"]  # both clip branches ran
    assert 0 < by["cispo"]["clipped_tokens"] < by["cispo"]["tokens"]
    for name in ("is_token_truncate", "is_token_mask"):
        assert by[name]["behavior_token_ratio_max"] > IS_CAP  # the cap / mask acted
    for name in ("is_sequence_truncate", "is_sequence_mask"):
        assert by[name]["behavior_seq_ratio_max"] > IS_CAP > by[name]["behavior_seq_ratio_min"]


@pytest.mark.slow
def test_offpolicy_comparison_detects_a_missing_correction(setup: dict[str, Any]) -> None:
    from llm_mdp.bench.common import quiet
    from llm_mdp.bench.vs_trl_numerics import compare_loss_type
    from llm_mdp.bench.vs_trl_offpolicy import OFFPOLICY_ROWS

    kw = dict(OFFPOLICY_ROWS["is_sequence_truncate"])
    kw["ours_overrides"] = {"behavior_correction": "tis", "behavior_cap": 2.0}  # token, not seq
    with quiet():
        wrong = compare_loss_type(**setup, **kw)
        no_seq = compare_loss_type(
            **setup, **(dict(OFFPOLICY_ROWS["gspo"]) | {"ours_overrides": {}})
        )
    assert not wrong["passed"] and wrong["grad_max_abs_diff"] > 1e-4
    assert not no_seq["passed"]  # token-level GRPO is not TRL's sequence-level GSPO
