"""What every benchmark shares: budgets, side-by-side timing, tasks, models, machine facts."""

from __future__ import annotations

import contextlib
import importlib
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from llm_mdp.tasks import ResponseBatch, Task
from llm_mdp.tasks.tokenizers import char_tokenizer


# ------------------------------------------------------------------------------- budgets
@dataclass(frozen=True)
class Budget:
    """Sizes and repeats of every section; ``tiny`` (tests), ``quick`` (CPU, < 5 min), ``full``.

    Attributes:
        name: the budget's name.
        rollout_vocabs, rollout_batches: the grid of the rollout section.
        rollout_new_tokens: response length of every rollout.
        rollout_model: ``(n_layer, n_embd)`` of the tiny GPT-2 used for rollouts.
        repeats, warmup: timed runs (median reported) and untimed warm-up runs per cell.
        update_steps: updates per run in the GRPO-vs-TRL section (the first is warm-up).
        update_seeds: seeds of that section (one run of each trainer per seed).
        update_batch: rollout batch ``B`` (prompts x group size) of that section.
        update_group: group size ``G`` (TRL's ``num_generations``).
        update_length: response cap ``R`` (TRL's ``max_completion_length``).
        update_model: ``(n_layer, n_embd)`` of the model both trainers train.
        update_wide_vocab, update_wide_steps: one more timing-only run on a character
            task with this many tokens (``None``: skip).
        memory_vocab, memory_model, memory_batch, memory_length: the one model and batch
            every agent is measured on (fresh process each).
        memory_steps: updates per agent (2: the second runs with Adam's moments alive).
        memory_variants: among ``defaults``, ``all-with-reference``, ``dense-head``, ``critics`` (see
            ``memory``).
        scaling_batches, scaling_lengths: the two axes of the scaling curve.
        scaling_fixed_batch, scaling_fixed_length: the other coordinate of each axis.
        scaling_steps: updates per point (the first is warm-up).
        scaling_trl: also time TRL at every scaling point.
        trepo_num_envs, trepo_steps: batch and interleaved updates of the TRePO-vs-GRPO
            cost section (the first pair is warm-up).
        critics_num_envs, critics_updates: batch and updates of every set-up in the
            critics section (PPO's critic options, GRPO, TRePO).
    """

    name: str
    rollout_vocabs: tuple[int, ...] = (256, 50257)
    rollout_batches: tuple[int, ...] = (16, 64, 256)
    rollout_new_tokens: int = 32
    rollout_model: tuple[int, int] = (2, 128)
    repeats: int = 5
    warmup: int = 1
    update_steps: int = 30
    update_seeds: tuple[int, ...] = (0, 1, 2)
    update_batch: int = 64
    update_group: int = 8
    update_length: int = 16
    update_model: tuple[int, int] = (2, 128)
    update_wide_vocab: int | None = 50257
    update_wide_steps: int = 8
    memory_vocab: int = 50257
    memory_model: tuple[int, int] = (4, 256)
    memory_batch: int = 32
    memory_length: int = 32
    memory_steps: int = 2
    memory_variants: tuple[str, ...] = ("defaults", "all-with-reference", "dense-head", "critics")
    scaling_batches: tuple[int, ...] = (16, 32, 64, 128, 256)
    scaling_lengths: tuple[int, ...] = (8, 16, 32, 64, 128)
    scaling_fixed_batch: int = 64
    scaling_fixed_length: int = 32
    scaling_steps: int = 5
    scaling_trl: bool = True
    trepo_num_envs: int = 64
    trepo_steps: int = 11
    critics_num_envs: int = 64
    critics_updates: int = 40


BUDGETS: dict[str, Budget] = {
    "full": Budget("full"),
    "quick": Budget(
        "quick",
        rollout_batches=(16, 64),
        repeats=3,
        update_steps=12,
        update_seeds=(0,),
        update_wide_steps=4,
        memory_model=(2, 128),
        memory_batch=16,
        memory_length=16,
        scaling_batches=(16, 32, 64, 128),
        scaling_lengths=(8, 16, 32, 64),
        scaling_fixed_length=16,
        scaling_steps=3,
        trepo_steps=6,
        critics_updates=15,
    ),
    "tiny": Budget(
        "tiny",
        rollout_vocabs=(64,),
        rollout_batches=(4,),
        rollout_new_tokens=4,
        rollout_model=(1, 16),
        repeats=1,
        warmup=0,
        update_steps=2,
        update_seeds=(0,),
        update_batch=8,
        update_group=4,
        update_length=4,
        update_model=(1, 16),
        update_wide_vocab=None,
        memory_vocab=64,
        memory_model=(1, 16),
        memory_batch=8,
        memory_length=4,
        memory_steps=1,
        memory_variants=("defaults",),
        scaling_batches=(4, 8),
        scaling_lengths=(2, 4),
        scaling_fixed_batch=8,
        scaling_fixed_length=4,
        scaling_steps=1,
        scaling_trl=False,
        trepo_num_envs=8,
        trepo_steps=2,
        critics_num_envs=8,
        critics_updates=2,
    ),
}


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence transformers' / datasets' progress bars, info logs and deprecation warnings
    (TRL's defaults trigger some) for the duration of a benchmark.

    Nests: on exit it restores the state it found, so an inner ``quiet()`` (a section
    inside ``run_bench``'s) does not turn the bars back on for the rest of the outer one.
    """
    import transformers

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    tlog = transformers.utils.logging
    level, bars = tlog.get_verbosity(), tlog.is_progress_bar_enabled()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    ds: Any = None
    with contextlib.suppress(ImportError):
        ds = importlib.import_module("datasets")
    ds_bars = ds is not None and not ds.are_progress_bars_disabled()
    if ds is not None:
        ds.disable_progress_bars()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        tlog.set_verbosity(level)
        if bars:
            tlog.enable_progress_bar()
        if ds_bars:
            ds.enable_progress_bars()


# ------------------------------------------------------------------------------- timing
def sync(device: torch.device | str | None = None) -> None:
    """Wait for queued GPU work (a no-op on CPU), so a wall-clock reading is honest."""
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize()


def time_once(fn: Callable[[], int]) -> tuple[float, int]:
    """Seconds of one call of ``fn`` and the count it returned (tokens, say)."""
    t0 = time.perf_counter()
    count = fn()
    sync()
    return time.perf_counter() - t0, count


def timed_side_by_side(
    fns: Sequence[Callable[[], int]], warmup: int, repeats: int
) -> list[tuple[float, int]]:
    """Median seconds and returned count of each ``fn``, runs interleaved (A B C A B C ...).

    Interleaving spreads load from other processes evenly over the methods compared.
    """
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    counts = [0] * len(fns)
    for _ in range(max(1, repeats)):
        for i, fn in enumerate(fns):
            dt, counts[i] = time_once(fn)
            times[i].append(dt)
    return [(statistics.median(t), n) for t, n in zip(times, counts, strict=True)]


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


# ------------------------------------------------------------------------------- tasks
def wide_alphabet(n: int) -> str:
    """``n`` distinct printable characters from U+0100 up (no newline, no surrogates)."""
    return "".join(chr(0x100 + i) for i in range(n))


def wide_task(
    vocab_size: int, n_prompts: int, new_tokens: int, seed: int = 0, *, reward: str = "zero"
) -> Task:
    """A task whose character tokenizer has exactly ``vocab_size`` tokens.

    Prompts have 4..16 characters (ragged, so left padding is exercised). ``reward``:
    ``"zero"`` (rollout timing needs none) or ``"target"`` (the fraction of the
    ``new_tokens`` slots holding the first character, read from the ids: no decoding).
    """
    alphabet = wide_alphabet(vocab_size - 1)  # id 0 is <eos> (also the pad token)
    tok = char_tokenizer(alphabet)
    gen = torch.Generator().manual_seed(seed)
    prompts = []
    for _ in range(n_prompts):
        n = int(torch.randint(4, 17, (1,), generator=gen))
        idx = torch.randint(0, len(alphabet), (n,), generator=gen).tolist()
        prompts.append("".join(alphabet[i] for i in idx))
    if reward not in ("zero", "target"):
        raise ValueError(f"reward={reward!r}, expected 'zero' or 'target'")

    def zero(batch: ResponseBatch) -> torch.Tensor:
        return torch.zeros(len(batch), dtype=torch.float64)

    def target(batch: ResponseBatch) -> torch.Tensor:
        hits = ((batch.response_ids == 2) & batch.response_mask.bool()).sum(-1)
        return hits.double() / new_tokens

    return Task(
        name=f"bench_v{vocab_size}",
        prompts=prompts,
        reward_fn=zero if reward == "zero" else target,
        tokenizer=tok,
        max_response_tokens=new_tokens,
    )


class CountReward:
    """The text reward both trainers share: the fraction of the ``length`` response slots
    that hold ``target`` (our ``target_token`` task, written on decoded text).

    Called TRL's way, ``fn(completions=[...], **kwargs)``, or ours,
    ``fn(prompts, responses)``. Records the batch mean of every call in ``calls``.
    """

    def __init__(self, target: str, length: int) -> None:
        self.target, self.length = target, length
        self.calls: list[float] = []
        self.last: list[float] = []
        self.lengths: list[float] = []  # mean completion length per TRL call
        self.__name__ = f"count_{target}"  # TRL names reward functions by __name__

    def score(self, responses: Sequence[str]) -> list[float]:
        out = [r.count(self.target) / self.length for r in responses]
        self.calls.append(sum(out) / max(1, len(out)))
        self.last = out
        return out

    def __call__(self, *args: Any, **kwargs: Any) -> list[float]:
        if "completions" in kwargs:  # TRL
            ids = kwargs.get("completion_ids") or []
            self.lengths.append(sum(len(c) for c in ids) / max(1, len(ids)))
            return self.score(kwargs["completions"])
        prompts, responses = args  # llm-mdp: Task.from_text_fn
        return self.score(responses)


@dataclass
class TextTask:
    """A text task with equal-length prompts (so no left padding: TRL's training forward
    passes no ``position_ids``) and the shared :class:`CountReward`; the character
    tokenizer of ``alphabet`` unless a pretrained model's ``tokenizer`` is given."""

    alphabet: str
    prompts: list[str]
    length: int
    target: str
    tokenizer: Any = None

    def reward(self) -> CountReward:
        return CountReward(self.target, self.length)

    def task(self, reward: CountReward) -> Task:
        return Task.from_text_fn(
            "count_target",
            self.prompts,
            reward,
            self.tokenizer if self.tokenizer is not None else char_tokenizer(self.alphabet),
            max_response_tokens=self.length,
            optimal_reward=1.0,
            description=f"fraction of the {self.length} slots that hold {self.target!r}",
        )


def text_task(
    length: int,
    *,
    alphabet: str = "abcdefgh",
    n_prompts: int = 32,
    prompt_len: int = 3,
    seed: int = 0,
) -> TextTask:
    gen = torch.Generator().manual_seed(seed)
    prompts = [
        "".join(alphabet[i] for i in torch.randint(0, len(alphabet), (prompt_len,), generator=gen))
        for _ in range(n_prompts)
    ]
    return TextTask(alphabet, prompts, length, alphabet[0])


# ------------------------------------------------------------------------------- models
def bench_model(
    vocab_size: int,
    model_size: tuple[int, int],
    *,
    max_positions: int,
    pad_token_id: int,
    eos_token_id: int,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> Any:
    """The tiny random GPT-2 every section uses: ``model_size = (n_layer, n_embd)``,
    up to 4 heads of width >= 16, float32, eval mode, on ``device``."""
    from llm_mdp.policies import tiny_gpt2

    n_layer, n_embd = model_size
    model: Any = tiny_gpt2(
        vocab_size,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=max(1, min(4, n_embd // 16)),
        max_positions=max_positions,
        seed=seed,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
    )
    return model.to(device)


# ------------------------------------------------------------------------------- machine
def versions() -> dict[str, str]:
    """Versions of the libraries whose speed is measured."""
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "trl", "accelerate", "datasets"):
        try:
            mod = __import__(name)
            out[name] = str(getattr(mod, "__version__", "?"))
        except Exception:  # not installed, or broken: report, don't fail
            out[name] = "not installed"
    return out


def machine(device: torch.device) -> dict[str, Any]:
    """CPU model, core count, torch threads and (on CUDA) the GPU's name."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def wide_env_model(
    vocab_size: int,
    batch: int,
    new_tokens: int,
    model_size: tuple[int, int],
    *,
    n_prompts: int,
    reward: str = "zero",
    device: torch.device | str = "cpu",
) -> tuple[Any, Any]:
    """``(env, model)``: an ``LLMTokenVectorEnv`` of ``batch`` rows on :func:`wide_task`
    and the :func:`bench_model` that fits it (positions for the env's width)."""
    from llm_mdp.envs import LLMTokenVectorEnv

    task = wide_task(vocab_size, n_prompts=n_prompts, new_tokens=new_tokens, reward=reward)
    env = LLMTokenVectorEnv(task, batch, device=device, info_text=False)
    model = bench_model(
        vocab_size,
        model_size,
        max_positions=env.W + 8,
        pad_token_id=env.pad_token_id,
        eos_token_id=env.eos_token_id,
        device=device,
    )
    return env, model
