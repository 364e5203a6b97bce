"""The command line: the main job's run folder, resume, episode walk-through, clear errors."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from llm_mdp.cli import main, make_parser, resolve_options


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llm_mdp.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
    )


def test_train_writes_run_folder_and_resumes(tmp_path: Path) -> None:
    run = tmp_path / "run"
    code = main(
        [
            "train",
            "--agent",
            "grpo",
            "--task",
            "target_token",
            "--updates",
            "6",
            "--num-envs",
            "8",
            "--set",
            "group_size=4",
            "--run-dir",
            str(run),
            "--no-progress",
        ]
    )
    assert code == 0
    for name in (
        "run.json",
        "metrics.csv",
        "checkpoint.pt",
        "curve.png",
        "samples_before.txt",
        "samples_after.txt",
    ):
        assert (run / name).exists(), name
    opts = json.loads((run / "run.json").read_text())
    assert opts["agent"] == "grpo" and opts["agent_config"]["group_size"] == 4
    assert main(["train", "--resume", str(run), "--updates", "9", "--no-progress"]) == 0
    with (run / "metrics.csv").open() as f:
        assert [int(float(r["update"])) for r in csv.DictReader(f)] == list(range(1, 10))


def test_config_file_and_flags(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        'agent = "reinforce"\ntask = "keyword"\nupdates = 2\nnum_envs = 4\n[agent_config]\nbaseline = "ema"\n'
    )
    run = tmp_path / "r"
    assert main(["train", "--config", str(cfg), "--run-dir", str(run), "--no-progress"]) == 0
    opts = json.loads((run / "run.json").read_text())
    assert opts["agent"] == "reinforce" and opts["agent_config"]["baseline"] == "ema"
    assert opts["task_args"] == {}
    args = ["--task", "keyword", "--task-arg", "keyword=abc"]
    assert resolve_options(make_parser().parse_args(["train", *args]))["task_args"] == {
        "keyword": "abc"
    }
    assert resolve_options(make_parser().parse_args(["train"]))["task_args"] == {"partial": True}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--agent", "nope"], "unknown agent 'nope'; known agents: reinforce, rloo"),
        (["train", "--task", "nope"], "unknown task 'nope'; known tasks: arithmetic"),
        (["train", "--model", "./no/such/model"], "model path './no/such/model' does not exist"),
        (["train", "--config", "missing.toml"], "config file 'missing.toml' does not exist"),
        (["train", "--config", "bad.toml"], "cannot parse config file 'bad.toml'"),
        (["train", "--config", "unknown.toml"], "unknown option(s) ['colour']"),
        (["train", "--set", "learning_rat=1"], "unknown TRePOConfig field(s) ['learning_rat']"),
        (["compare", "--agents", "grpo,nope"], "unknown agent 'nope'"),
    ],
)
def test_user_errors_are_one_line_exit_2(
    args: list[str],
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """In-process: any exception other than the CLI's own error would escape and fail."""
    (tmp_path / "bad.toml").write_text("agent = [unclosed\n")
    (tmp_path / "unknown.toml").write_text('colour = "blue"\n')
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llm-mdp: error: "), lines
    assert message in lines[0]


def test_user_error_from_a_real_process_has_no_traceback(tmp_path: Path) -> None:
    proc = run_cli("train", "--agent", "nope", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "llm-mdp: error: unknown agent 'nope'; known agents: reinforce, rloo, remax, grpo, ppo, trepo"
    ]


def test_episode_shows_zero_rewards_then_rm(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["episode", "--task", "hidden_rewards", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line[:3].strip().isdigit()]
    rewards = [
        float(r.split()[-2] if r.rstrip().endswith(("terminated", "truncated")) else r.split()[-1])
        for r in rows
    ]
    assert all(r == 0.0 for r in rewards[:-1])
    assert "sum_t gamma^(t-1) r_t" in out
    total = float(out.split("RM(W) = ")[1].split()[0])
    assert total == pytest.approx(rewards[-1], abs=1e-4)


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("train", "compare", "episode", "verify", "bench"):
        assert cmd in out
