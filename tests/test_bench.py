"""``llm-mdp bench``: every section runs on the tiny budget; our GRPO loss and gradient
equal TRL's ``GRPOTrainer._compute_loss`` on a fixed batch (no timing asserts)."""

from __future__ import annotations

import importlib.util
import json
import tempfile
from pathlib import Path

import pytest
import torch

from llm_mdp.bench import SECTIONS, bench_cli
from llm_mdp.bench.cli import format_table, summary_rows
from llm_mdp.bench.vs_trl import LOSS_TYPES, trl_status

TRL_OK, TRL_WHY = trl_status() if importlib.util.find_spec("trl") else (False, "trl not installed")
needs_trl = pytest.mark.skipif(not TRL_OK, reason=f"needs trl (pip install trl): {TRL_WHY}")


@pytest.mark.slow
def test_bench_cli_tiny_runs_every_section(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench"
    assert bench_cli(["--tiny", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["budget"] == "tiny" and res["sections"] == list(SECTIONS)
    assert res["command"] == f"llm-mdp bench --tiny --out {out}"
    assert (out / "scaling.png").stat().st_size > 0
    assert "| what | ours | peer | ratio | goal |" in (out / "summary.md").read_text()

    (row,) = res["rollout"]
    assert row["env_tokens"] > 0 and row["env_tok_s"] > 0 and row["generate_tok_s"] > 0

    mem = {r["agent"]: r for r in res["memory"]["rows"]}
    assert set(mem) == {"ppo", "grpo", "trepo"}
    assert mem["ppo"]["critic"] and not mem["grpo"]["critic"] and not mem["trepo"]["critic"]
    assert mem["grpo"]["reference_model"] and not mem["trepo"]["reference_model"]
    # PPO holds a second network (critic) and its Adam moments: more state than GRPO
    assert mem["ppo"]["state_mb"] > mem["grpo"]["state_mb"]
    assert all(r["peak_mb"] >= r["baseline_mb"] for r in mem.values())

    tr = res["trepo"]  # value rollouts: more episodes and decoded rows than GRPO's 8
    assert tr["grpo"]["episodes_per_update"] == 8
    assert tr["trepo"]["episodes_per_update"] > 8
    assert tr["trepo"]["decoded_per_update"] > tr["grpo"]["decoded_per_update"] > 0
    assert tr["ratio_min"] <= tr["ratio"] <= tr["ratio_max"]

    cr = res["critics"]["setups"]  # PPO's critics beside GRPO and TRePO, same task and seed
    assert set(cr) == {"grpo", "trepo", "ppo-copy", "ppo-shared", "ppo-small"}
    n = {k: v["trainable_params"] for k, v in cr.items()}
    assert n["grpo"] == n["trepo"] < n["ppo-shared"] < n["ppo-small"] < n["ppo-copy"]
    # tied GPT-2: the policy is its trunk; shared adds a value head, copy a trunk + value head
    assert n["ppo-shared"] - n["grpo"] == n["ppo-copy"] - 2 * n["grpo"] == 65  # H + 1
    assert all(0.0 <= v["final_batch_reward"] <= 1.0 for v in cr.values())

    curves = res["scaling"]["curves"]
    assert [p["batch"] for p in curves["batch"]] == [4, 8]
    assert [p["length"] for p in curves["length"]] == [2, 4]

    if TRL_OK:
        assert res["numerics"]["passed"]
        up = res["update"]
        assert len(up["runs"][0]["trl_times"]) == len(up["runs"][0]["ours_times"]) == 2
        assert 0.0 <= up["ours_final_reward"] <= 1.0 and 0.0 <= up["trl_final_reward"] <= 1.0
    else:
        assert "skipped" in res["update"] and "skipped" in res["numerics"]
    printed = capsys.readouterr().out
    assert "rollout tokens/s, vocab 64, batch 4" in printed


@needs_trl
def test_grpo_loss_and_gradient_equal_trl_for_every_loss_type() -> None:
    from llm_mdp.bench.vs_trl_numerics import bench_numerics

    res = bench_numerics(log=lambda *a: None, offpolicy=False)  # tests/test_offpolicy_trl.py
    assert [r["loss_type"] for r in res["rows"]] == list(LOSS_TYPES)
    for r in res["rows"]:
        assert r["loss_diff"] <= 1e-5, r
        assert r["grad_max_abs_diff"] <= 1e-5, r
        assert r["advantage_max_abs_diff"] <= 1e-6, r
        assert r["reward_max_abs_diff"] == 0.0, r
        assert r["logp_max_abs_diff"] <= 1e-5, r
        assert r["grad_max_abs"] > 1e-3, r  # a real gradient, not two zeros
        assert 0 < r["clipped_tokens"] < r["tokens"], r  # both branches of the clip ran
    assert res["passed"]


@needs_trl
def test_numerics_comparison_detects_a_mismatch() -> None:
    """The check has power: our token-sum aggregation against TRL's ``grpo`` fails."""
    from llm_mdp.bench.common import quiet, text_task
    from llm_mdp.bench.vs_trl import save_model
    from llm_mdp.bench.vs_trl_numerics import compare_loss_type

    tt = text_task(6, n_prompts=4)
    with tempfile.TemporaryDirectory() as tmp, quiet():
        folder = Path(tmp) / "model"
        save_model(folder, tt, (1, 32), 0, max_positions=20)
        same = compare_loss_type("grpo", folder=folder, tt=tt, group=4, length=6)
        other = compare_loss_type(
            "grpo",
            folder=folder,
            tt=tt,
            group=4,
            length=6,
            ours_overrides={"aggregation": "seq-mean-token-sum"},
        )
        no_kl = compare_loss_type(
            "grpo", folder=folder, tt=tt, group=4, length=6, ours_overrides={"kl_coef": 0.0}
        )
    assert same["passed"]
    assert not other["passed"] and other["loss_diff"] > 1e-3
    assert not no_kl["passed"]  # TRL's beta * k3 term is in the compared loss


def test_bench_cli_rejects_unknown_sections(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_cli(["--only", "rollout,nope"]) == 2
    assert "unknown section(s) ['nope']" in capsys.readouterr().err


def test_summary_reports_skipped_trl_sections() -> None:
    res = {
        "update": {"skipped": "trl not usable"},
        "numerics": {"skipped": "trl not usable"},
    }
    rows = summary_rows(res)
    assert [r[3] for r in rows] == ["skipped", "skipped"]
    assert "trl not usable" in format_table(rows, markdown=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_bench_cli_rejects_cuda_without_a_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_cli(["--tiny", "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_repeats_give_each_ratio_its_run_to_run_spread() -> None:
    def run(ratio: float) -> dict[str, object]:
        agent = {
            "step_s": 0.1,
            "encoded_per_update": 10,
            "decoded_per_update": 20,
            "episodes_per_update": 8,
        }
        tr = {"settings": {"num_envs": 8}, "grpo": agent, "trepo": agent}
        return {"trepo": tr | {"ratio": ratio, "ratio_min": ratio, "ratio_max": ratio}}

    rows = summary_rows(dict(run(2.0), repeats=[run(2.5), run(1.25)]))
    assert rows[0][3] == "2.00x (2.00-2.00) [runs: 2.00 (1.25-2.50)]"
    assert summary_rows(run(2.0))[0][3] == "2.00x (2.00-2.00)"  # one run: no spread
