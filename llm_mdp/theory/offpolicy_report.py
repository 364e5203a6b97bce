"""``llm-mdp verify --off-policy``: every estimator under sampling mismatches, exactly.

For each estimator of :func:`offpolicy_specs` and each behavior of
:func:`standard_behaviors` (on-policy, temperature 0.7, top-p 0.9, a stale policy one
gradient step behind): relative bias, cosine with ``grad J(pi)`` and trace of the
covariance. Then the exact bias of uncorrected top-p sampling next to its closed form
(:meth:`~llm_mdp.theory.offpolicy.OffPolicyModel.truncation_bias`), the bias of each
correction as a function of its cap ``C`` and of the mismatch (temperature), and a
figure of the last two. Theory: ``docs/theory.md#off-policy``, ``docs/estimators.md``.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .moments import ExactModel
from .offpolicy import Behavior, OffPolicyModel, OffPolicySpec, make_behavior
from .setups import paper_setup
from .specs import InputSpec

__all__ = [
    "OffPolicyReport",
    "OffPolicyRow",
    "format_offpolicy_report",
    "offpolicy_checks",
    "offpolicy_specs",
    "plot_offpolicy",
    "run_offpolicy",
    "stale_policy",
    "standard_behaviors",
    "verify_offpolicy",
]

CAPS = (1.0, 1.25, 1.5, 2.0, 3.0, 5.0, math.inf)
TEMPERATURES = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.2, 1.5)
CORRECTIONS = ("tis", "mis", "seq_tis", "seq_mis")


def stale_policy(model: ExactModel, step: float = 1.0) -> Any:
    """A copy of ``model.policy`` one gradient-ascent step of size ``step`` *behind*:
    ``theta - step * grad J``, so that ``pi`` is the stale policy after its update."""
    stale = copy.deepcopy(model.policy)
    params = [p for p in stale.parameters() if p.requires_grad]
    offset = 0
    with torch.no_grad():
        for p in params:
            n = p.numel()
            p.sub_(step * model.grad_J[offset : offset + n].view_as(p).to(p.dtype))
            offset += n
    return stale


def standard_behaviors(model: ExactModel) -> list[Behavior]:
    """On-policy, ``T = 0.7``, top-p 0.9 and a stale policy (one step behind)."""
    return [
        make_behavior(model, "on-policy"),
        make_behavior(model, "temperature", temperature=0.7),
        make_behavior(model, "top_p", top_p=0.9),
        make_behavior(model, "stale", policy=stale_policy(model)),
    ]


def offpolicy_specs() -> list[OffPolicySpec]:
    """The estimators of the table (``docs/estimators.md`` has one row per name)."""
    tm, tok = "seq-mean-token-mean", "token-mean"
    grpo: dict[str, Any] = {"advantage": "grpo", "group_size": 2}
    clip: dict[str, Any] = {"clip_low": 0.2, "clip_high": 0.2}
    return [
        OffPolicySpec(label="REINFORCE"),
        OffPolicySpec(correction="seq_tis", label="REINFORCE + seq_tis (C=inf)"),
        OffPolicySpec(correction="seq_tis", cap=2.0, label="REINFORCE + seq_tis (C=2)"),
        OffPolicySpec(correction="seq_mis", cap=2.0, label="REINFORCE + seq_mis (C=2)"),
        OffPolicySpec(correction="tis", label="REINFORCE + tis (C=inf)"),
        OffPolicySpec(correction="tis", cap=2.0, label="REINFORCE + tis (C=2)"),
        OffPolicySpec(correction="mis", cap=2.0, label="REINFORCE + mis (C=2)"),
        OffPolicySpec(inputs=InputSpec(baseline="value"), correction="seq_tis",
                      label="REINFORCE - V + seq_tis"),
        OffPolicySpec(advantage="rloo", group_size=2, label="RLOO (G=2)"),
        OffPolicySpec(advantage="rloo", group_size=2, correction="seq_tis",
                      label="RLOO + seq_tis (G=2)"),
        OffPolicySpec(**grpo, loss="ppo_clip", loss_options=clip, aggregation=tm,
                      label="GRPO (G=2)"),
        OffPolicySpec(**grpo, loss="ppo_clip", loss_options=clip, aggregation=tm, old="behavior",
                      label="GRPO, old = mu (G=2)"),
        OffPolicySpec(**grpo, loss="ppo_clip", loss_options={"clip_low": 0.2, "clip_high": 0.28},
                      aggregation=tok, dynamic_sampling=True, label="DAPO (G=2)"),
        OffPolicySpec(**grpo, loss="gspo", aggregation=tm, label="GSPO (G=2)"),
        OffPolicySpec(**grpo, loss="gspo", aggregation=tm, old="behavior",
                      label="GSPO, old = mu (G=2)"),
        OffPolicySpec(**grpo, loss="cispo", aggregation=tok, old="behavior",
                      label="CISPO, old = mu (G=2)"),
        OffPolicySpec(advantage="reinforce_pp", group_size=2, label="REINFORCE++ (B=2)"),
        OffPolicySpec(advantage="reinforce_pp_baseline", group_size=2,
                      label="REINFORCE++-baseline (G=2)"),
    ]  # fmt: skip


@dataclass(frozen=True)
class OffPolicyRow:
    """One estimator under one behavior."""

    estimator: str
    behavior: str
    relative_bias: float
    cosine: float
    trace_cov: float


@dataclass
class OffPolicyReport:
    """Everything ``verify --off-policy`` prints and plots.

    Attributes:
        setup: the exact set-up in words.
        rows: the table (estimator x behavior).
        top_p: per top-p value: exact bias, closed form, irreducible part, kept mass.
        cap_sweep: ``{(behavior, correction): [(C, relative bias)]}``.
        temperature_sweep: ``{correction label: [(T, relative bias)]}``, untruncated.
    """

    setup: str
    rows: list[OffPolicyRow] = field(default_factory=list)
    top_p: list[dict[str, float]] = field(default_factory=list)
    cap_sweep: dict[tuple[str, str], list[tuple[float, float]]] = field(default_factory=dict)
    temperature_sweep: dict[str, list[tuple[float, float]]] = field(default_factory=dict)


def _rel(om: OffPolicyModel, spec: OffPolicySpec) -> float:
    return om.compare(om.moments(spec)).relative_error


def verify_offpolicy(
    model: ExactModel | None = None,
    *,
    specs: Sequence[OffPolicySpec] | None = None,
    caps: Sequence[float] = CAPS,
    temperatures: Sequence[float] = TEMPERATURES,
) -> OffPolicyReport:
    """Compute the off-policy report on ``model`` (default: ``paper_setup()``, tabular)."""
    m = paper_setup() if model is None else model
    gnorm = float(m.grad_J.norm())
    rep = OffPolicyReport(setup=m.tree.describe())
    behaviors = standard_behaviors(m)
    for beh in behaviors:
        om = OffPolicyModel(m, beh)
        for spec in specs if specs is not None else offpolicy_specs():
            mom = om.moments(spec)
            cmp = om.compare(mom)
            rep.rows.append(
                OffPolicyRow(spec.display, beh.name, cmp.relative_error, cmp.cosine, mom.trace_cov)
            )
    for p in (0.95, 0.9, 0.8, 0.7):
        om = OffPolicyModel(m, make_behavior(m, "top_p", top_p=p))
        tb = om.truncation_bias()
        plain = om.moments(OffPolicySpec()).mean
        rep.top_p.append(
            {
                "top_p": p,
                "kept_mass": tb.kept_mass,
                "relative_bias": float((plain - m.grad_J).norm()) / gnorm,
                "closed_form_error": float((plain - tb.mean).abs().max()),
                "irreducible": float(tb.irreducible.norm()) / gnorm,
                "seq_is_relative_bias": _rel(om, OffPolicySpec(correction="seq_tis")),
            }
        )
    for beh in behaviors[1:]:
        if beh.truncation:
            continue
        om = OffPolicyModel(m, beh)
        for corr in CORRECTIONS:
            rep.cap_sweep[(beh.name, corr)] = [
                (c, _rel(om, OffPolicySpec(correction=corr, cap=c))) for c in caps
            ]
    labels = {"none": "uncorrected", "tis": "token IS (C=inf)", "seq_tis": "sequence IS (C=inf)"}
    for corr, label in labels.items():
        rep.temperature_sweep[label] = [
            (t, _rel(OffPolicyModel(m, make_behavior(m, "temperature", temperature=t)),
                     OffPolicySpec(correction=corr)))
            for t in temperatures
        ]  # fmt: skip
    return rep


def format_offpolicy_report(rep: OffPolicyReport) -> str:
    """The report as plain-text tables."""
    behaviors = list(dict.fromkeys(r.behavior for r in rep.rows))
    names = list(dict.fromkeys(r.estimator for r in rep.rows))
    by = {(r.estimator, r.behavior): r for r in rep.rows}
    w = max(len(n) for n in names) + 2
    out = [f"Off-policy estimators, exact ({rep.setup})", ""]
    out.append("relative bias |E g - grad J| / |grad J|  /  cosine  /  tr Cov, per behavior:")
    out.append(" " * w + "".join(f"{b:>30}" for b in behaviors))
    for n in names:
        cells = [by[(n, b)] for b in behaviors]
        out.append(
            f"{n:<{w}}"
            + "".join(
                f"{r.relative_bias:>12.2e} {r.cosine:>7.4f} {r.trace_cov:>9.3g}" for r in cells
            )
        )
    out += ["", "uncorrected top-p: exact bias = closed form; the irreducible part stays"]
    out.append(
        f"{'top_p':>6} {'kept mass':>10} {'rel. bias':>10} {'|exact - closed form|':>22} "
        f"{'irreducible':>12} {'seq-IS bias':>12}"
    )
    for row in rep.top_p:
        out.append(
            f"{row['top_p']:>6g} {row['kept_mass']:>10.4f} {row['relative_bias']:>10.4f} "
            f"{row['closed_form_error']:>22.1e} {row['irreducible']:>12.4f} "
            f"{row['seq_is_relative_bias']:>12.4f}"
        )
    out += ["", "relative bias against the cap C:"]
    caps = [c for c, _ in next(iter(rep.cap_sweep.values()))] if rep.cap_sweep else []
    out.append(f"{'behavior':<16}{'correction':<12}" + "".join(f"{c:>9g}" for c in caps))
    for (b, corr), pts in rep.cap_sweep.items():
        out.append(f"{b:<16}{corr:<12}" + "".join(f"{v:>9.4f}" for _, v in pts))
    out += ["", "relative bias against the sampling temperature (untruncated):"]
    temps = [t for t, _ in next(iter(rep.temperature_sweep.values()))]
    out.append(f"{'':<22}" + "".join(f"{t:>8g}" for t in temps))
    for label, pts in rep.temperature_sweep.items():
        out.append(f"{label:<22}" + "".join(f"{v:>8.4f}" for _, v in pts))
    return "\n".join(out)


def plot_offpolicy(rep: OffPolicyReport, path: str | Path) -> Path:
    """Two panels: bias against the cap ``C``; bias against the temperature."""
    from llm_mdp.plotting import _pyplot

    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for (b, corr), pts in rep.cap_sweep.items():
        xs = [c if math.isfinite(c) else 2 * max(x for x, _ in pts if math.isfinite(x)) for c, _ in pts]  # fmt: skip
        ax1.plot(xs, [v for _, v in pts], marker="o", label=f"{corr}, {b}")
    ax1.set_xscale("log")
    ax1.set_xlabel("cap C (rightmost point: C = inf)")
    ax1.set_ylabel("|E g - grad J| / |grad J|")
    ax1.set_title("bias of each correction against its cap")
    ax1.legend(fontsize=7)
    for label, pts in rep.temperature_sweep.items():
        ax2.plot([t for t, _ in pts], [v for _, v in pts], marker="o", label=label)
    ax2.axvline(1.0, color="grey", lw=0.5)
    ax2.set_xlabel("sampling temperature of mu (pi at T = 1)")
    ax2.set_title("untruncated corrections against the mismatch")
    ax2.legend(fontsize=8)
    fig.suptitle(rep.setup, fontsize=8)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def offpolicy_checks(rep: OffPolicyReport, tol: float = 1e-9) -> dict[str, bool]:
    """What theory says, checked on the report (``docs/theory.md#off-policy``)."""
    seq = [r for r in rep.rows if r.estimator == "REINFORCE + seq_tis (C=inf)"]
    covering = [r for r in seq if not r.behavior.startswith("top_")]
    token = [r for r in rep.rows if r.estimator == "REINFORCE + tis (C=inf)"]
    return {
        "sequence IS unbiased under every covering behavior": all(
            r.relative_bias < tol for r in covering
        ),
        "token IS biased under every mismatch": all(
            r.relative_bias > 1e-3 for r in token if r.behavior != "on-policy"
        ),
        "uncorrected top-p bias equals its closed form": all(
            t["closed_form_error"] < tol for t in rep.top_p
        ),
        "sequence IS under top-p leaves exactly the irreducible part": all(
            abs(t["seq_is_relative_bias"] - t["irreducible"]) < tol for t in rep.top_p
        ),
        "truncated sequence IS bias reaches 0 as C grows": all(
            pts[-1][1] < tol for (_, c), pts in rep.cap_sweep.items() if c == "seq_tis"
        ),
    }


def run_offpolicy(
    *,
    policy: str = "tabular",
    seed: int = 0,
    horizon: int = 4,
    plot: str | os.PathLike[str] | None = None,
    json_path: str | os.PathLike[str] | None = None,
) -> int:
    """``llm-mdp verify --off-policy``: print the tables; 0 when every check passed.

    Raises:
        ValueError: a bad set-up (the CLI prints it as one line and exits 2).
    """
    model = paper_setup(policy=policy, seed=seed, horizon=horizon)
    rep = verify_offpolicy(model)
    print(format_offpolicy_report(rep))
    checks = offpolicy_checks(rep)
    print()
    for what, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {what}")
    if plot:
        print(f"plot: {plot_offpolicy(rep, Path(plot))}")
    if json_path:
        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "setup": rep.setup,
            "rows": [r.__dict__ for r in rep.rows],
            "top_p": rep.top_p,
            "cap_sweep": {f"{b}/{c}": pts for (b, c), pts in rep.cap_sweep.items()},
            "temperature_sweep": rep.temperature_sweep,
            "checks": checks,
        }
        path.write_text(json.dumps(data, indent=2, default=str))
        print(f"json: {path}")
    return 0 if all(checks.values()) else 1
