"""Off-policy rows of the TRL numerics: GSPO, CISPO and TRL's importance-sampling correction.

Each row is :func:`llm_mdp.bench.vs_trl_numerics.compare_loss_type` on the same fixed batch with
TRL's trainer switched to the variant (attributes of ``GRPOTrainer`` set before it scores
the batch; TRL's own ``_generate_and_score_completions`` and ``_compute_loss`` run) and
our GRPO config set to the estimator of the same name:

=======================  =========================================  ===============================
row                      TRL                                        ours
=======================  =========================================  ===============================
``gspo``                 ``importance_sampling_level="sequence"``   ``importance_sampling_level=
                                                                    "sequence"`` (loss ``gspo``)
``cispo``                ``loss_type="cispo"``, ``epsilon_high=e``  ``loss="cispo"``,
                                                                    ``clip_high=e - 1``
``is_<mode>``            ``vllm_importance_sampling_correction``,   ``behavior_correction`` =
                         ``vllm_importance_sampling_mode=<mode>``,  ``tis`` / ``mis`` / ``seq_tis``
                         ``..._clip_max=C`` (sampler log-probs:     / ``seq_mis``, ``behavior_cap=C``
                         ``pi`` + noise)
=======================  =========================================  ===============================

The IS rows use ``old = pi`` (TRL recomputes ``old_per_token_logps`` when it corrects, so
the surrogate's ratio is 1 and only the correction differs from plain GRPO).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llm_mdp.bench.common import TextTask
from llm_mdp.bench.vs_trl_numerics import compare_loss_type

__all__ = ["IS_MODES", "OFFPOLICY_ROWS", "compare_offpolicy_rows"]

IS_MODES: dict[str, str] = {
    "token_truncate": "tis",
    "token_mask": "mis",
    "sequence_truncate": "seq_tis",
    "sequence_mask": "seq_mis",
}
"""TRL's ``vllm_importance_sampling_mode`` -> our ``behavior_correction``."""

IS_CAP = 2.0
CISPO_EPS_HIGH = 1.1  # TRL's cap on the ratio; ours is clip_high = 0.1


def _rows() -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {
        "gspo": {
            "loss_type": "grpo",
            "epsilon": 0.03,
            "epsilon_high": 0.04,
            "trl_attrs": {"importance_sampling_level": "sequence"},
            "ours_overrides": {"importance_sampling_level": "sequence"},
        },
        "cispo": {
            "loss_type": "dapo",
            "trl_attrs": {"loss_type": "cispo", "epsilon_high": CISPO_EPS_HIGH},
            "ours_overrides": {
                "loss": "cispo",
                "loss_options": {"clip_high": CISPO_EPS_HIGH - 1.0},
            },
        },
    }
    for mode, ours in IS_MODES.items():
        rows[f"is_{mode}"] = {
            "loss_type": "grpo",
            "noise_old": 0.0,
            "behavior_noise": 0.5,
            "trl_attrs": {
                "use_vllm": True,
                "vllm_importance_sampling_correction": True,
                "vllm_importance_sampling_mode": mode,
                "vllm_importance_sampling_clip_max": IS_CAP,
                "vllm_importance_sampling_clip_min": None,
            },
            "ours_overrides": {"behavior_correction": ours, "behavior_cap": IS_CAP},
        }
    return rows


OFFPOLICY_ROWS: dict[str, dict[str, Any]] = _rows()
"""Row name -> keyword arguments of :func:`~llm_mdp.bench.vs_trl_numerics.compare_loss_type`."""


def compare_offpolicy_rows(
    *,
    folder: Path,
    tt: TextTask,
    group: int,
    length: int,
    seed: int = 0,
    rows: tuple[str, ...] = tuple(OFFPOLICY_ROWS),
) -> list[dict[str, Any]]:
    """One :func:`compare_loss_type` result per row, ``"loss_type"`` set to the row's name."""
    out = []
    for name in rows:
        r = compare_loss_type(
            folder=folder, tt=tt, group=group, length=length, seed=seed, **OFFPOLICY_ROWS[name]
        )
        r["loss_type"] = name
        out.append(r)
    return out
