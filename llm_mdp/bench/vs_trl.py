"""Our GRPO against TRL's ``GRPOTrainer``: matched settings, update-step time, reward, numerics.

Matched settings (read from TRL's own source, ``trl/trainer/grpo_trainer.py``):

==========================  ==================================  ================================
what                        TRL ``GRPOConfig``                  ours (``GRPOConfig``)
==========================  ==================================  ================================
group size                  ``num_generations=G``               ``group_size=G``
batch per update            ``per_device_train_batch_size=B``,  ``num_envs=B``
                            ``gradient_accumulation_steps=1``,
                            ``steps_per_generation=1`` (one
                            generation batch per optimizer step)
response cap                ``max_completion_length=R``          ``max_response_tokens=R``
loss aggregation            ``loss_type``: ``grpo`` /           ``aggregation``:
                            ``dr_grpo`` / ``dapo`` / ``bnpo``   ``seq-mean-token-mean`` /
                                                                ``seq-mean-token-sum-norm``
                                                                (``max_len=R``) / ``token-mean``
                                                                / ``token-mean``
advantage                   ``scale_rewards="group"``, std      ``std_scaling="group"``,
                            + 1e-4 (Bessel)                     ``std_eps=1e-4`` (Bessel)
clip                        ``epsilon`` / ``epsilon_high``      ``clip_low`` / ``clip_high``
KL                          ``beta`` (k3 in the loss),          ``kl_coef``, ``kl_estimator="k3"``,
                            ``use_bias_correction_kl=False``    ``kl_placement="loss"``
epochs                      ``num_iterations=1``                ``epochs=1, minibatches=1``
optimizer                   AdamW (fused), constant LR, no      AdamW, constant LR, no decay,
                            decay, grad-norm clip 1.0           grad-norm clip 1.0
generation                  ``model.generate`` (no vLLM),       env + ``CausalLMPolicy.act``,
                            temperature 1, top_p 1, top_k 0     temperature 1, full softmax
precision / memory tricks   ``bf16=False``,                     float32, no checkpointing
                            ``gradient_checkpointing=False``
truncated responses         ``mask_truncated_completions=False`` kept in the loss (the cap is
                                                                ``terminated``)
==========================  ==================================  ================================

``use_bias_correction_kl`` (TRL's default ``True``) multiplies the k3 term by the
importance ratio -- a different KL gradient that we do not implement -- so it is off.
TRL's defaults that differ from TRL's docs' "recommended" set-up (bf16, gradient
checkpointing) are turned off because they trade speed for memory on a GPU and are
unavailable or pointless on CPU; the table in ``benchmarks/README.md`` says so.

Prompts all have the same length: TRL's training forward passes no ``position_ids``
(so a left-padded prompt gets shifted positions), whereas generation and our policy use
``cumsum(mask) - 1``. Equal-length prompts make both sides score the same function.
"""

from __future__ import annotations

import dataclasses
import importlib
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch

from llm_mdp.agents import GRPO, GRPOConfig
from llm_mdp.bench.common import (
    CountReward,
    TextTask,
    bench_model,
    median,
    quiet,
    sync,
    text_task,
    wide_alphabet,
)
from llm_mdp.envs import LLMTokenVectorEnv
from llm_mdp.policies import CausalLMPolicy
from llm_mdp.tasks.tokenizers import char_tokenizer

LOSS_TYPES: dict[str, str] = {
    "grpo": "seq-mean-token-mean",
    "dr_grpo": "seq-mean-token-sum-norm",
    "dapo": "token-mean",
    "bnpo": "token-mean",
}
"""TRL ``loss_type`` -> our ``aggregation`` (both with the PPO-clip surrogate and k3 KL)."""

STD_EPS = 1e-4  # TRL adds 1e-4 to the std (hard-coded in _generate_and_score_completions)


def trl_status() -> tuple[bool, str]:
    """``(True, version)`` when TRL and ``datasets`` import, else ``(False, why)``."""
    try:
        trl = importlib.import_module("trl")
        importlib.import_module("datasets")
        trl.GRPOTrainer  # noqa: B018 - lazy attribute: fails here if the trainer is missing
    except Exception as exc:
        return False, f"trl not usable ({type(exc).__name__}: {exc}); pip install trl"
    return True, str(trl.__version__)


@dataclass
class Matched:
    """One set of GRPO settings, written both ways (see the module's table)."""

    batch: int
    group: int
    length: int
    loss_type: str = "grpo"
    beta: float = 0.04
    learning_rate: float = 2e-3
    epsilon: float = 0.2
    epsilon_high: float | None = None
    scale_rewards: str = "group"
    max_grad_norm: float = 1.0
    temperature: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type={self.loss_type!r}; matched ones: {sorted(LOSS_TYPES)}")
        if self.batch % self.group:
            raise ValueError(f"batch={self.batch} is not a multiple of group={self.group}")
        if self.scale_rewards not in ("group", "batch", "none"):
            raise ValueError(f"scale_rewards={self.scale_rewards!r}; expected group, batch or none")

    def ours(self) -> GRPOConfig:
        return GRPOConfig(
            seed=self.seed,
            group_size=self.group,
            learning_rate=self.learning_rate,
            max_grad_norm=self.max_grad_norm,
            epochs=1,
            minibatches=1,
            loss="ppo_clip",
            clip_low=self.epsilon,
            clip_high=self.epsilon_high,
            aggregation=LOSS_TYPES[self.loss_type],
            kl_coef=self.beta,
            kl_estimator="k3",
            kl_placement="loss",
            temperature=self.temperature,
            std_scaling=cast(Any, self.scale_rewards),  # same names as TRL's
            std_eps=STD_EPS,
        )

    def trl(self, output_dir: str, steps: int, device: torch.device) -> Any:
        trl = importlib.import_module("trl")
        fields = {f.name for f in dataclasses.fields(trl.GRPOConfig)}
        # transformers >= 5.x renamed gradient_checkpointing (TRL's default: on)
        ckpt = (
            "activation_checkpointing"
            if "activation_checkpointing" in fields
            else "gradient_checkpointing"
        )
        return trl.GRPOConfig(
            output_dir=output_dir,
            **{ckpt: False},
            per_device_train_batch_size=self.batch,
            gradient_accumulation_steps=1,
            steps_per_generation=1,
            num_generations=self.group,
            max_completion_length=self.length,
            num_iterations=1,
            loss_type=self.loss_type,
            beta=self.beta,
            use_bias_correction_kl=False,
            epsilon=self.epsilon,
            epsilon_high=self.epsilon_high,
            scale_rewards=self.scale_rewards,
            mask_truncated_completions=False,
            learning_rate=self.learning_rate,
            lr_scheduler_type="constant",
            warmup_steps=0,
            weight_decay=0.0,
            max_grad_norm=self.max_grad_norm,
            temperature=self.temperature,
            top_p=1.0,
            top_k=0,
            use_vllm=False,
            bf16=False,
            fp16=False,
            disable_dropout=True,
            use_cpu=device.type == "cpu",
            max_steps=steps,
            logging_steps=max(1, steps),
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
            dataloader_num_workers=0,
            seed=self.seed,
        )


def save_model(
    folder: Path, tt: TextTask, model_size: tuple[int, int], seed: int, max_positions: int
) -> Any:
    """A tiny GPT-2 for ``tt``'s character vocabulary, saved (with the tokenizer) to ``folder``.

    TRL loads its reference model from the policy's ``name_or_path``, so the model must
    live in a folder; both trainers load the same weights from it.
    """
    tok = char_tokenizer(tt.alphabet)
    model = bench_model(
        len(tok),
        model_size,
        max_positions=max_positions,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        seed=seed,
    )
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return tok


def load_model(folder: Path, device: torch.device) -> Any:
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model.to(device).eval()


def make_trainer(
    folder: Path,
    cfg: Matched,
    tt: TextTask,
    reward: CountReward,
    steps: int,
    device: torch.device,
    callbacks: list[Any] | None = None,
) -> Any:
    """TRL's ``GRPOTrainer`` on the model in ``folder``, an in-memory dataset, no hub."""
    trl = importlib.import_module("trl")
    datasets = importlib.import_module("datasets")
    from transformers import AutoTokenizer
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    threads = torch.get_num_threads()
    trainer = trl.GRPOTrainer(
        model=str(folder),
        reward_funcs=reward,
        args=cfg.trl(str(folder / "trl-out"), steps, device),
        train_dataset=datasets.Dataset.from_dict({"prompt": list(tt.prompts)}),
        processing_class=AutoTokenizer.from_pretrained(folder),
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    torch.set_num_threads(threads)  # keep the comparison on the same thread count
    return trainer


@torch.no_grad()
def sampled_reward(
    model: Any, tt: TextTask, per_prompt: int, seed: int, device: torch.device
) -> float:
    """Mean reward of ``per_prompt`` sampled responses to every prompt of the pool: the same
    evaluator (our env and sampler) for a model trained by either trainer."""
    task = tt.task(tt.reward())
    env = LLMTokenVectorEnv(task, len(tt.prompts) * per_prompt, device=device, info_text=False)
    policy = CausalLMPolicy(model, task.tokenizer, seed=10_000 + seed)
    from llm_mdp.agents import rollout

    ro = rollout(
        env,
        policy,
        {"prompt_indices": list(range(len(tt.prompts))), "group_size": per_prompt},
    )
    return float(ro.rewards.mean())


# ------------------------------------------------------------------------ update step
def run_update_pair(
    *,
    steps: int,
    batch: int,
    group: int,
    length: int,
    model_size: tuple[int, int],
    seed: int,
    device: torch.device,
    loss_type: str = "grpo",
    learning_rate: float = 2e-3,
    eval_per_prompt: int = 8,
    evaluate: bool = True,
    task: TextTask | None = None,
    pretrained: tuple[Any, Any] | None = None,
) -> dict[str, Any]:
    """``steps`` updates of our GRPO and of TRL's, interleaved step by step (TRL, ours, ...).

    TRL's step is timed from ``on_step_begin`` to ``on_step_end`` (generation, scoring,
    reference log-probs, loss, backward, clip, optimizer step; the data loader's fetch and
    TRL's logging fall outside); ours is one ``agent.train_step()`` (all of it). The first
    step of each is warm-up and not in the median. ``task`` defaults to
    ``text_task(length)`` (8 letters, reward = fraction of ``"a"``). ``pretrained =
    (model, tokenizer)`` trains that model instead of a random GPT-2 of ``model_size``
    (its tokenizer must be ``task``'s).
    """
    from transformers import TrainerCallback

    tt = task if task is not None else text_task(length)
    cfg = Matched(
        batch=batch,
        group=group,
        length=length,
        loss_type=loss_type,
        learning_rate=learning_rate,
        seed=seed,
    )
    with tempfile.TemporaryDirectory(prefix="llm-mdp-bench-") as tmp, quiet():
        folder = Path(tmp) / "model"
        P = len(tt.prompts[0])
        if pretrained is None:
            save_model(folder, tt, model_size, seed, max_positions=P + length + 8)
        else:
            for part in pretrained:
                part.save_pretrained(folder)

        ours_task = tt.task(tt.reward())
        env = LLMTokenVectorEnv(ours_task, batch, device=device, info_text=False)
        policy = CausalLMPolicy(load_model(folder, device), ours_task.tokenizer, seed=seed)
        agent = GRPO(env, policy, cfg.ours())

        ours_t: list[float] = []
        trl_t: list[float] = []
        ours_len: list[float] = []
        ours_rewards: list[float] = []

        class Interleave(TrainerCallback):
            t0 = 0.0

            def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                sync(device)
                self.t0 = time.perf_counter()

            def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                sync(device)
                trl_t.append(time.perf_counter() - self.t0)
                t = time.perf_counter()
                m = agent.train_step()
                sync(device)
                ours_t.append(time.perf_counter() - t)
                ours_len.append(m["response/length"])
                ours_rewards.append(m["reward/mean"])

        trl_reward = tt.reward()
        trainer = make_trainer(folder, cfg, tt, trl_reward, steps, device, [Interleave()])
        trainer.train()
        trl_len = trl_reward.lengths
        out: dict[str, Any] = {
            "seed": seed,
            "steps": steps,
            "ours_step_s": median(ours_t[1:] or ours_t),
            "trl_step_s": median(trl_t[1:] or trl_t),
            "ours_times": ours_t,
            "trl_times": trl_t,
            "ours_rewards": ours_rewards,
            "trl_rewards": list(trl_reward.calls),
            "ours_mean_length": sum(ours_len) / max(1, len(ours_len)),
            "trl_mean_length": sum(trl_len) / len(trl_len) if trl_len else float("nan"),
        }
        out["trl_over_ours"] = out["trl_step_s"] / out["ours_step_s"]
        if evaluate:
            trained = load_model(folder, device)
            trained.load_state_dict(trainer.model.state_dict())
            out["ours_final_reward"] = sampled_reward(
                policy.model, tt, eval_per_prompt, seed, device
            )
            out["trl_final_reward"] = sampled_reward(trained, tt, eval_per_prompt, seed, device)
            out["initial_reward"] = sampled_reward(
                load_model(folder, device), tt, eval_per_prompt, seed, device
            )
        del trainer
    return out


def bench_update(
    *,
    steps: int,
    seeds: tuple[int, ...],
    batch: int,
    group: int,
    length: int,
    model_size: tuple[int, int],
    device: torch.device,
    wide_vocab: int | None = None,
    wide_steps: int = 6,
    log: Any = print,
) -> dict[str, Any]:
    """:func:`run_update_pair` for every seed, with medians and ratios over seeds; then,
    with ``wide_vocab``, one timing-only run on a character task of that many tokens (a
    GPT-2-sized vocabulary: sampling and the LM head dominate)."""
    runs = []
    for seed in seeds:
        r = run_update_pair(
            steps=steps,
            batch=batch,
            group=group,
            length=length,
            model_size=model_size,
            seed=seed,
            device=device,
        )
        log(
            f"  update seed {seed}: ours {r['ours_step_s'] * 1e3:.1f} ms/step, TRL "
            f"{r['trl_step_s'] * 1e3:.1f} ms/step ({r['trl_over_ours']:.2f}x); reward after "
            f"{steps} updates: ours {r['ours_final_reward']:.3f}, TRL {r['trl_final_reward']:.3f} "
            f"(initial {r['initial_reward']:.3f})"
        )
        runs.append(r)
    summary = {
        "ours_step_s": median([r["ours_step_s"] for r in runs]),
        "trl_step_s": median([r["trl_step_s"] for r in runs]),
        "trl_over_ours": median([r["trl_over_ours"] for r in runs]),
        "ours_final_reward": sum(r["ours_final_reward"] for r in runs) / len(runs),
        "trl_final_reward": sum(r["trl_final_reward"] for r in runs) / len(runs),
        "initial_reward": sum(r["initial_reward"] for r in runs) / len(runs),
        "ours_last_batch_reward": sum(r["ours_rewards"][-1] for r in runs) / len(runs),
        "trl_last_batch_reward": sum(r["trl_rewards"][-1] for r in runs) / len(runs),
        "ours_mean_batch_reward": sum(sum(r["ours_rewards"]) / len(r["ours_rewards"]) for r in runs)
        / len(runs),
        "trl_mean_batch_reward": sum(sum(r["trl_rewards"]) / len(r["trl_rewards"]) for r in runs)
        / len(runs),
    }
    wide = None
    if wide_vocab:
        wide = run_update_pair(
            steps=wide_steps,
            batch=batch,
            group=group,
            length=length,
            model_size=model_size,
            seed=0,
            device=device,
            evaluate=False,
            task=text_task(length, alphabet=wide_alphabet(wide_vocab - 2), prompt_len=4),
        )
        wide["vocab"] = wide_vocab
        log(
            f"  update vocab {wide_vocab}: ours {wide['ours_step_s'] * 1e3:.1f} ms/step, TRL "
            f"{wide['trl_step_s'] * 1e3:.1f} ms/step ({wide['trl_over_ours']:.2f}x)"
        )
    return {
        "wide_vocab": wide,
        "settings": {
            "steps": steps,
            "seeds": list(seeds),
            "batch": batch,
            "group": group,
            "length": length,
            "model": f"gpt2 {model_size[0]}x{model_size[1]}",
            "loss_type": "grpo",
            "beta": 0.04,
            "learning_rate": 2e-3,
        },
        "runs": runs,
        **summary,
    }
