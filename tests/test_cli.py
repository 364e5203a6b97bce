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
        env={
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
        },
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
        "llm-mdp: error: unknown agent 'nope'; known agents: reinforce, rloo, remax, grpo, ppo, trepo, reinforce_pp"
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
    hidden = out.split("hidden token rewards r_t = [")[1].split("]")[0].split(", ")
    assert len(hidden) == len(rows)  # one r_t per step, no padding
    assert sum(float(x) for x in hidden) == pytest.approx(total, abs=1e-3)  # gamma = 1


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("train", "compare", "episode", "verify", "bench"):
        assert cmd in out


# ---------------------------------------------------------------------------- runs never lost
GRPO_RUN = [
    "--agent", "grpo", "--task", "target_token", "--num-envs", "8", "--set", "group_size=4",
    "--set", "checkpoint_every=2", "--no-progress",
]  # fmt: skip


def _rows(run: Path) -> list[dict[str, str]]:
    """metrics.csv without the wall-clock columns (they differ from run to run)."""
    with (run / "metrics.csv").open() as f:
        return [
            {k: v for k, v in r.items() if not k.startswith("time/") and k != "tokens_per_s"}
            for r in csv.DictReader(f)
        ]


def _ckpt_update(run: Path) -> int:
    from llm_mdp.agents.checkpoint import read_checkpoint

    return int(read_checkpoint(run / "checkpoint.pt")["counters"]["update"])


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("ref") / "run"
    assert main(["train", *GRPO_RUN, "--updates", "6", "--run-dir", str(run)]) == 0
    return run


@pytest.mark.parametrize("where", ["between updates (Ctrl-C)", "inside an update"])
def test_interrupt_then_resume_logs_every_update_once_and_matches_uninterrupted(
    where: str,
    reference_run: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Ctrl-C after update 3 saves a checkpoint at 3; an interrupt inside update 4 keeps
    the checkpoint of update 2 and resume drops the logged row 3 before redoing it."""
    import os
    import signal

    from llm_mdp.agents import Agent

    original = Agent.train_step

    def interrupted(self: Agent) -> dict[str, float]:
        if where == "inside an update" and self.update == 3:
            raise KeyboardInterrupt
        out = original(self)
        if where.startswith("between") and self.update == 3:
            os.kill(os.getpid(), signal.SIGINT)  # handled: the loop stops after this update
        return out

    run = tmp_path / "run"
    monkeypatch.setattr(Agent, "train_step", interrupted)
    assert main(["train", *GRPO_RUN, "--updates", "6", "--run-dir", str(run)]) == 130
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert f"continue with: llm-mdp train --resume {run}" in err
    saved_at = 3 if where.startswith("between") else 2
    assert len(_rows(run)) == 3
    assert _ckpt_update(run) == saved_at
    assert main(["train", "--resume", str(run), "--updates", "6", "--no-progress"]) == 0
    assert [r["update"] for r in _rows(run)] == [str(u) for u in range(1, 7)]
    assert _rows(run) == _rows(reference_run)
    record = json.loads((run / "run.json").read_text())
    assert [r["at_update"] for r in record["resumed"]] == [saved_at]
    assert record["updates"] == 6


def test_resume_at_or_past_the_target_says_so_and_changes_nothing(
    reference_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = {p.name: p.read_bytes() for p in reference_run.iterdir() if p.is_file()}
    assert main(["train", "--resume", str(reference_run), "--updates", "4"]) == 0
    assert "at update 6, at or past --updates 4: nothing to do" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in reference_run.iterdir() if p.is_file()} == before


def test_overwrite_replaces_the_run(reference_run: Path, tmp_path: Path) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    (run / "notes.md").write_text("mine\n")
    assert main(["train", *GRPO_RUN, "--updates", "2", "--run-dir", str(run), "--overwrite"]) == 0
    assert _rows(run) == _rows(reference_run)[:2]  # one run, not two appended
    assert _ckpt_update(run) == 2 and (run / "notes.md").read_text() == "mine\n"


def test_run_json_round_trips_as_config(reference_run: Path, tmp_path: Path) -> None:
    """``--config run.json`` repeats the run exactly; flags still override it."""
    run = tmp_path / "again"
    cfg = str(reference_run / "run.json")
    assert main(["train", "--config", cfg, "--run-dir", str(run), "--no-progress"]) == 0
    first, again = (json.loads((r / "run.json").read_text()) for r in (reference_run, run))
    assert first | {"run_dir": str(run)} == again
    assert _rows(run) == _rows(reference_run)
    opts = resolve_options(make_parser().parse_args(["train", "--config", cfg, "--lr", "0.5"]))
    assert "learning_rate" not in opts["agent_config"] and opts["lr"] == 0.5


def test_agent_load_continues_logging_in_its_run_folder(
    reference_run: Path, tmp_path: Path
) -> None:
    """The Python API: Agent.load(..., run_dir=...) drops rows past the checkpoint, then logs."""
    import shutil

    from llm_mdp.agents import GRPO
    from llm_mdp.cli.build import build

    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    opts = json.loads((run / "run.json").read_text())
    env, policy, _, _ = build(opts | {"updates": 8})
    agent = GRPO.load(run / "checkpoint.pt", env, policy, run_dir=run)
    assert agent.update == 6
    agent.learn(7, progress=False)
    assert [r["update"] for r in _rows(run)] == [str(u) for u in range(1, 8)]


def test_train_help_and_list_document_every_field(capsys: pytest.CaptureFixture[str]) -> None:
    import dataclasses

    from llm_mdp.agents import AGENTS

    with pytest.raises(SystemExit) as exit_:
        main(["train", "--list"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for cls in AGENTS.values():
        for f in dataclasses.fields(cls.config_class):
            line = next(line for line in out.splitlines() if line.startswith(f"  {f.name} ("))
            doc = out.splitlines()[out.splitlines().index(line) + 1]
            assert doc.startswith("      ") and doc.strip(), f.name
    assert "  learning_rate (float, > 0) default 1e-05" in out
    assert "AdamW learning rate." in out
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "  std_eps (float, >= 0) grpo: default 1e-06 only" in capsys.readouterr().out
