"""Every user error: one line naming the value and what was expected, exit 2, nothing on
disk changed (the CLI), or an exception naming the value (the Python API).

One row per bad input; the CLI rows run in-process (any exception other than the CLI's
own error would escape and fail the test), and one row runs in a real process to check
the exit path has no traceback.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llm_mdp.cli import main

# A real run folder (2 updates of REINFORCE on target_token), made once, copied per row.
RUN = ["--agent", "reinforce", "--task", "target_token", "--num-envs", "4", "--no-progress"]


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("real") / "run"
    assert main(["train", *RUN, "--updates", "2", "--run-dir", str(run)]) == 0
    return run


def _prepare(root: Path, real_run: Path) -> None:
    """The files the rows point at, inside the row's own folder."""
    (root / "folder.toml").mkdir()
    (root / "ten.toml").write_text('updates = "ten"\n')
    (root / "five.toml").write_text("agent_config = 5\n")
    (root / "notes.txt").write_text("agent = 'grpo'\n")
    (root / "afile").write_text("not a folder\n")
    shutil.copytree(real_run, root / "run")
    for name, damage in {
        "corrupt": lambda p: p.write_bytes(b"\x00garbage" * 64),
        "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
        "empty": lambda p: p.write_bytes(b""),
    }.items():
        shutil.copytree(real_run, root / f"ckpt_{name}")
        damage(root / f"ckpt_{name}" / "checkpoint.pt")
    for name, text in {"empty": "", "corrupt": "{not json", "badtype": '{"agent": 5}'}.items():
        shutil.copytree(real_run, root / f"json_{name}")
        (root / f"json_{name}" / "run.json").write_text(text)
    for name, change in {
        "other_agent": {"agent": "rloo", "agent_config": {}},
        "other_task": {"task": "keyword"},
    }.items():
        shutil.copytree(real_run, root / name)
        record = json.loads((real_run / "run.json").read_text()) | change
        (root / name / "run.json").write_text(json.dumps(record))
    shutil.copytree(real_run, root / "no_ckpt")
    (root / "no_ckpt" / "checkpoint.pt").unlink()


ROOT = Path(__file__).resolve().parents[1]  # this checkout, also for the real process
CUDA = torch.cuda.is_available()
CLI_ROWS: list[tuple[list[str], str]] = [
    (["train", "--num-envs", "0"], "--num-envs: expected an integer >= 1, got 0"),
    (["train", "--updates", "0"], "--updates: expected an integer >= 1, got 0"),
    (["train", "--tokens", "0"], "--tokens: expected an integer >= 1, got 0"),
    (["train", "--lr", "-1"], "--lr: expected a finite number > 0, got -1"),
    (["train", "--lr", "nan"], "--lr: expected a finite number > 0, got nan"),
    (["train", "--seed", "-1"], "--seed: expected an integer >= 0, got -1"),
    (["train", "--threads", "0"], "--threads: expected an integer >= 1, got 0"),
    (["train", "--num-envs", "many"], "--num-envs: expected an integer, got 'many'"),
    (["train", "--set", "learning_rate=nan"], "learning_rate=nan: expected a finite number > 0"),
    (["train", "--set", "kl_coef=-1"], "kl_coef=-1.0: expected a finite number >= 0"),
    (["train", "--set", "epochs=1.5"], "epochs=1.5: expected an int"),
    (["train", "--set", "group_size=0"], "group_size=0: expected an integer >= 1"),
    (["train", "--set", "adam_betas=[0.9]"], "adam_betas=[0.9]: expected a tuple[float, float]"),
    (["train", "--set", "kl_placement=both"], "kl_placement='both': expected one of 'reward'"),
    (["train", "--set", "learning_rat=1"], "unknown TRePOConfig field(s) ['learning_rat']"),
    (["train", "--lr", "1", "--set", "learning_rate=2"], "--lr 1.0 and --set learning_rate=2"),
    (["train", "--agent", "grpo", "--num-envs", "3"], "--num-envs 3: expected a multiple of"),
    (["train", "--agent", "nope"], "unknown agent 'nope'; known agents: reinforce, rloo"),
    (["train", "--task", "nope"], "unknown task 'nope'; known tasks: arithmetic"),
    (["train", "--task-arg", "partial=maybe"], "partial='maybe': expected a bool"),
    (["train", "--task-arg", "colour=1"], "unknown --task-arg 'colour'"),
    (["train", "--task-arg", "partial"], "expected KEY=VALUE, got 'partial'"),
    (["train", "--model", "./no/such/model"], "model path './no/such/model' does not exist"),
    (["train", "--device", "tpu"], "--device 'tpu': expected auto, cpu, cuda, cuda:N or mps"),
    (["train", "--config", "missing.toml"], "config file 'missing.toml' does not exist"),
    (["train", "--config", "ten.toml"], "updates='ten': expected an int"),
    (["train", "--config", "five.toml"], "agent_config=5: expected a dict[str, Any]"),
    (["train", "--config", "folder.toml"], "config file 'folder.toml' is a folder"),
    (["train", "--config", "notes.txt"], "expected a .toml, .yaml, .yml or .json file"),
    (["train", "--run-dir", "afile"], "--run-dir 'afile' exists and is not a folder"),
    (["train", "--run-dir", "afile/run"], "'afile' is a file, not a folder"),
    (["train", "--run-dir", "run"], "--run-dir 'run' already holds a run (run.json, metrics"),
    (["train", "--resume", "nowhere"], "--resume 'nowhere': no such folder"),
    (["train", "--resume", "run", "--overwrite"], "--resume and --overwrite: give one of them"),
    (["train", "--resume", "run", "--agent", "grpo", "--lr", "1"], "cannot change --agent grpo"),
    (["train", "--resume", "run", "--set", "kl_coef=0.5"], "--set kl_coef=0.5 (the run has 0.0)"),
    (
        ["train", "--resume", "no_ckpt"],
        "no checkpoint.pt or checkpoint/ (stopped before its first update)",
    ),
    (["train", "--resume", "ckpt_corrupt"], "cannot be read (truncated or not a torch file)"),
    (["train", "--resume", "ckpt_truncated"], "cannot be read (truncated or not a torch file)"),
    (["train", "--resume", "ckpt_empty"], "checkpoint 'ckpt_empty/checkpoint.pt' is empty"),
    (["train", "--resume", "json_empty"], "cannot parse run file 'json_empty/run.json'"),
    (["train", "--resume", "json_corrupt"], "cannot parse run file 'json_corrupt/run.json'"),
    (["train", "--resume", "json_badtype"], "run file 'json_badtype/run.json': agent=5"),
    (["train", "--resume", "other_agent"], "is for agent 'reinforce', not 'rloo'"),
    (["train", "--resume", "other_task"], "is for task 'target_token', not 'keyword'"),
    (["episode", "--checkpoint", "ckpt_corrupt/checkpoint.pt"], "cannot be read"),
    (["compare", "--agents", "grpo,nope"], "unknown agent 'nope'"),
    (["compare", "--agents", "reinforce,grpo", "--num-envs", "4"], "multiple of grpo's group"),
    (["verify", "--horizon", "-2"], "--horizon: expected an integer in [1, 8], got -2"),
    (["verify", "--horizon", "12"], "--horizon: expected an integer in [1, 8], got 12"),
    (["verify", "--gamma", "0"], "--gamma: expected a finite number in (0, 1], got 0"),
    (["verify", "--mc-samples", "1"], "--mc-samples: expected an integer >= 2, got 1"),
    (
        ["verify", "--plot", "afile/plot.png"],
        "--plot 'afile/plot.png': 'afile' is a file, not a folder",
    ),
    (["verify", "--json", "folder.toml"], "--json 'folder.toml' is a folder"),
    (["bench", "--only", "nope"], "unknown section(s) ['nope']"),
    (["bench", "--threads", "0"], "--threads 0, expected >= 1"),
]
if not CUDA:
    CLI_ROWS.append((["train", "--device", "cuda"], "--device cuda: CUDA is not available here"))


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` with a hash of its bytes (folders as ``<dir>``)."""
    return {
        str(p.relative_to(root)): "<dir>"
        if p.is_dir()
        else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
    }


@pytest.mark.parametrize(("args", "message"), CLI_ROWS, ids=[" ".join(a) for a, _ in CLI_ROWS])
def test_cli_user_error_is_one_line_exit_2_and_changes_nothing(
    args: list[str],
    message: str,
    real_run: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _prepare(tmp_path, real_run)
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    assert main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and re.match(r"llm-mdp( bench)?: error: ", lines[0]), lines
    assert message in lines[0]
    assert snapshot(tmp_path) == before  # no partial run folder, no file touched
    assert not Path("runs").exists()


def test_user_error_in_a_real_process_has_no_traceback(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "llm_mdp.cli", "train", "--set", "learning_rate=-1"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "llm-mdp: error: TRePOConfig: learning_rate=-1.0: expected a finite number > 0"
    ]
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- Python API
def _env_policy(num_envs: int = 4) -> tuple[object, object]:
    from llm_mdp.envs import LLMTokenVectorEnv
    from llm_mdp.policies import CausalLMPolicy, tiny_gpt2
    from llm_mdp.tasks import make_task

    env = LLMTokenVectorEnv(make_task("target_token"), num_envs)
    model = tiny_gpt2(
        env.vocab_size, seed=0, pad_token_id=env.pad_token_id, eos_token_id=env.eos_token_id
    )
    return env, CausalLMPolicy(model, env.tokenizer, vocab_size=env.vocab_size, seed=0)


@pytest.mark.parametrize(
    ("config", "kwargs", "error", "message"),
    [
        ("GRPOConfig", {"learning_rate": -1}, ValueError, "learning_rate=-1.0: expected a finite"),
        ("GRPOConfig", {"learning_rate": float("nan")}, ValueError, "learning_rate=nan"),
        (
            "GRPOConfig",
            {"kl_coef": -0.1},
            ValueError,
            "kl_coef=-0.1: expected a finite number >= 0",
        ),
        ("GRPOConfig", {"std_eps": -1.0}, ValueError, "std_eps=-1.0"),
        ("PPOConfig", {"gamma": 0.0}, ValueError, "gamma=0.0: expected a finite number in (0, 1]"),
        ("PPOConfig", {"epochs": "2"}, TypeError, "epochs='2': expected an int"),
        ("PPOConfig", {"whiten_advantages": "yes"}, TypeError, "whiten_advantages='yes'"),
        ("TRePOConfig", {"group_size": 1}, ValueError, "group_size=1: expected an integer >= 2"),
        ("TRePOConfig", {"num_anchors": 0}, ValueError, "num_anchors=0: expected an integer >= 1"),
        ("REINFORCEConfig", {"baseline_decay": 1.5}, ValueError, "baseline_decay=1.5"),
        ("RLOOConfig", {"temperature": 0.0}, ValueError, "temperature=0.0"),
        ("RLOOConfig", {"kl_estimator": "k9"}, ValueError, "kl_estimator='k9': unknown KL"),
        ("RLOOConfig", {"aggregation": "mean"}, ValueError, "aggregation='mean': expected one of"),
        (
            "ReMaxConfig",
            {"dual_clip": 1.0},
            ValueError,
            "dual_clip=1.0: expected a finite number > 1",
        ),
    ],
)
def test_config_rejects_bad_values_naming_the_field(
    config: str, kwargs: dict[str, object], error: type[Exception], message: str
) -> None:
    import llm_mdp.agents as agents

    with pytest.raises(error) as info:
        getattr(agents, config)(**kwargs)
    assert message in str(info.value)


def test_config_converts_only_losslessly() -> None:
    from llm_mdp.agents import GRPOConfig

    cfg = GRPOConfig(learning_rate=1, adam_betas=[0.9, 0.95])  # type: ignore[arg-type]
    assert cfg.learning_rate == 1.0 and isinstance(cfg.learning_rate, float)
    assert cfg.adam_betas == (0.9, 0.95)


def test_agent_api_errors_name_the_value(tmp_path: Path) -> None:
    from llm_mdp.agents import GRPO, REINFORCE, CheckpointError, GRPOConfig

    env, policy = _env_policy(num_envs=3)
    with pytest.raises(ValueError, match=r"env.num_envs=3 is not a multiple of group_size=8"):
        GRPO(env, policy, GRPOConfig())  # type: ignore[arg-type]
    agent = REINFORCE(env, policy)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"total_updates=-5: expected an integer >= 0"):
        agent.learn(-5)
    with pytest.raises(TypeError, match=r"total_updates=2.5: expected an int"):
        agent.learn(2.5)  # type: ignore[arg-type]
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"checkpoint '.*bad.pt' is empty"):
        REINFORCE.load(bad, env, policy)  # type: ignore[arg-type]
    torch.save({"format": 1, "weights": torch.zeros(2)}, bad)
    with pytest.raises(CheckpointError, match=r"bad.pt' lacks the key\(s\) \['agent'"):
        REINFORCE.load(bad, env, policy)  # type: ignore[arg-type]
    agent.save(tmp_path / "ok.pt")
    with pytest.raises(CheckpointError, match=r"is for agent 'reinforce', not 'grpo'"):
        GRPO.load(tmp_path / "ok.pt", env, policy)  # type: ignore[arg-type]


def test_logging_into_a_folder_with_another_run_is_refused(tmp_path: Path) -> None:
    from llm_mdp.agents import REINFORCE

    env, policy = _env_policy()
    REINFORCE(env, policy, run_dir=tmp_path).learn(1, progress=False)  # type: ignore[arg-type]
    before = snapshot(tmp_path)
    with pytest.raises(FileExistsError, match=r"metrics.csv' already holds 1 updates"):
        REINFORCE(env, policy, run_dir=tmp_path).learn(1, progress=False)  # type: ignore[arg-type]
    assert snapshot(tmp_path) == before


def test_verify_choices_match_the_toolkit() -> None:
    from llm_mdp.cli import verify
    from llm_mdp.theory import LENGTH_CAPS, POLICY_KINDS

    assert set(verify.LENGTH_CAPS) == set(LENGTH_CAPS)
    assert set(verify.POLICY_KINDS) == set(POLICY_KINDS)
