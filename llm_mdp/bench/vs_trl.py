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

from llm_mdp.agents import GRPO, GRPOConfig, Rollout
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
from llm_mdp.tasks import ResponseBatch
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
) -> dict[str, Any]:
    """``steps`` updates of our GRPO and of TRL's, interleaved step by step (TRL, ours, ...).

    TRL's step is timed from ``on_step_begin`` to ``on_step_end`` (generation, scoring,
    reference log-probs, loss, backward, clip, optimizer step; the data loader's fetch and
    TRL's logging fall outside); ours is one ``agent.train_step()`` (all of it). The first
    step of each is warm-up and not in the median. ``task`` defaults to
    ``text_task(length)`` (8 letters, reward = fraction of ``"a"``).
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
        save_model(folder, tt, model_size, seed, max_positions=P + length + 8)

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


# ------------------------------------------------------------------------- numerics
def _fixed_batch(
    tt: TextTask, tok: Any, group: int, length: int, seed: int
) -> tuple[list[list[int]], list[list[int]], list[str]]:
    """Prompt ids, completion ids and prompt texts of one fixed batch: ragged completions,
    some ending in EOS, some cut at the cap, one group with equal rewards (zero std)."""
    gen = torch.Generator().manual_seed(seed)
    V = len(tok)
    target = tok.convert_tokens_to_ids(tt.target)
    first = min(i for i in range(V) if i not in set(tok.all_special_ids))  # first character
    prompt_ids, completion_ids, texts = [], [], []
    for p, prompt in enumerate(tt.prompts):
        ids = tok(prompt, add_special_tokens=False).input_ids
        for g in range(group):
            n = int(torch.randint(1, length + 1, (1,), generator=gen))
            toks = torch.randint(first, V, (n,), generator=gen).tolist()
            if p == 1:  # a group whose rewards are all 0: std 0, advantage 0
                toks = [t if t != target else target + 1 for t in toks]
            if n < length or g % 2:  # EOS-terminated (at the cap too, on odd rows)
                toks[-1] = tok.eos_token_id
            prompt_ids.append(list(ids))
            completion_ids.append(toks)
            texts.append(prompt)
    return prompt_ids, completion_ids, texts


def _pad(rows: list[list[int]], pad: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
        for n, p in model.named_parameters()
    }


def compare_loss_type(
    loss_type: str,
    *,
    folder: Path,
    tt: TextTask,
    group: int,
    length: int,
    seed: int = 0,
    beta: float = 0.04,
    epsilon: float = 0.2,
    epsilon_high: float | None = 0.28,
    noise_old: float = 0.15,
    noise_ref: float = 0.3,
    ours_overrides: dict[str, Any] | None = None,
    trl_attrs: dict[str, Any] | None = None,
    behavior_noise: float | None = None,
) -> dict[str, Any]:
    """Loss and gradient of our GRPO and TRL's ``_compute_loss`` on one fixed batch.

    TRL side, nothing of theirs rewritten: ``GRPOTrainer._generate`` (the sampling) is
    replaced by a function returning the fixed completions, then TRL's own
    ``_generate_and_score_completions`` decodes them, calls the shared reward function
    and computes the advantages; the rollout log-probs (``old_per_token_logps``) and the
    reference log-probs (``ref_per_token_logps``) of that inputs dict are set to the fixed
    tensors; ``_compute_loss(model, inputs)`` gives the loss; ``backward`` the gradient.
    Our side: the same batch as a :class:`Rollout`, ``GRPO.advantages`` and
    ``GRPO.accumulate_gradients`` (the code ``train_step`` runs). ``ours_overrides``
    changes fields of our config only (a negative control: a mismatch must fail).
    ``trl_attrs`` are set on TRL's trainer before it scores the batch (its
    ``loss_type``, ``importance_sampling_level``, vLLM importance-sampling settings ...).
    ``behavior_noise``: the completions were sampled by a behavior policy whose
    log-probs are ``pi``'s plus this much Gaussian noise; TRL gets them as the sampler's
    log-probs (``sampling_per_token_logps``), we as ``extras["behavior_logp"]``.
    """
    cfg = Matched(
        batch=len(tt.prompts) * group,
        group=group,
        length=length,
        loss_type=loss_type,
        beta=beta,
        epsilon=epsilon,
        epsilon_high=epsilon_high,
        seed=seed,
    )
    cpu = torch.device("cpu")
    tok = char_tokenizer(tt.alphabet)
    prompt_rows, completion_rows, prompt_texts = _fixed_batch(tt, tok, group, length, seed)
    B, P = len(prompt_rows), len(prompt_rows[0])
    L = max(len(c) for c in completion_rows)
    prompt_ids = torch.tensor(prompt_rows)
    resp_ids, resp_mask = _pad(completion_rows, tok.pad_token_id, L)
    ids = torch.cat([prompt_ids, resp_ids], 1)
    mask = torch.cat([torch.ones_like(prompt_ids), resp_mask], 1)

    # ---- ours
    reward_o = tt.reward()
    task = tt.task(reward_o)
    env = LLMTokenVectorEnv(task, B, info_text=False, max_prompt_tokens=P)
    policy = CausalLMPolicy(load_model(folder, cpu), task.tokenizer, seed=seed)
    agent = GRPO(env, policy, dataclasses.replace(cfg.ours(), **(ours_overrides or {})))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        logp0 = policy.log_probs(ids, mask, P)
    old = (logp0 + noise_old * torch.randn(B, L, generator=gen)) * resp_mask
    ref = (logp0 + noise_ref * torch.randn(B, L, generator=gen)) * resp_mask
    behavior = None
    if behavior_noise is not None:
        behavior = (logp0 + behavior_noise * torch.randn(B, L, generator=gen)) * resp_mask
    rb = ResponseBatch(
        prompt_ids=prompt_ids,
        prompt_mask=torch.ones_like(prompt_ids),
        response_ids=resp_ids,
        response_mask=resp_mask,
        prompt_indices=torch.arange(B) // group,
        tokenizer=task.tokenizer,
    )
    rewards_o = task.score(rb).float()
    batch = Rollout(
        input_ids=ids,
        attention_mask=mask,
        prompt_width=P,
        rewards=rewards_o,
        sample_logp=old,
        prompt_indices=torch.arange(B) // group,
        group_size=group,
        extras={"ref_logp": ref} | ({} if behavior is None else {"behavior_logp": behavior}),
    )
    adv_o = agent.advantages(batch).float()
    batch.extras["advantages"] = adv_o
    agent.optimizer.zero_grad(set_to_none=True)
    stats = agent.accumulate_gradients(batch)
    loss_o = float(stats["loss/total"])
    grads_o = _grads(policy.model)
    with torch.no_grad():
        logp_o = policy.log_probs(ids, mask, P)

    # ---- TRL
    reward_t = tt.reward()
    trainer = make_trainer(folder, cfg, tt, reward_t, steps=1, device=cpu)
    for name, value in (trl_attrs or {}).items():
        if not hasattr(trainer, name):
            raise AttributeError(f"TRL's GRPOTrainer has no attribute {name!r}")
        setattr(trainer, name, value)
    model = trainer.model
    model.train()  # TRL's mode during training (dropout is 0 in these models)
    if not hasattr(trainer, "current_gradient_accumulation_steps"):
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop in training

    def fixed_generate(prompts: list[Any]) -> tuple[Any, ...]:
        completions = tok.batch_decode(completion_rows, skip_special_tokens=True)
        sampling = None
        if behavior is not None:
            sampling = [behavior[i, : len(c)].tolist() for i, c in enumerate(completion_rows)]
        return prompt_rows, completion_rows, None, completions, sampling, {}, None, []

    trainer._generate = fixed_generate
    inputs = trainer._generate_and_score_completions([{"prompt": t} for t in prompt_texts])
    if tuple(inputs["completion_ids"].shape) != (B, L) or not torch.equal(
        inputs["completion_mask"].cpu(), resp_mask
    ):
        raise RuntimeError("TRL laid the fixed batch out differently from ours")
    inputs["old_per_token_logps"] = old.clone()
    inputs["ref_per_token_logps"] = ref.clone()
    model.zero_grad(set_to_none=True)
    loss_t_tensor = trainer._compute_loss(model, inputs)
    loss_t_tensor.backward()
    loss_t = float(loss_t_tensor.detach())
    grads_t = _grads(model)
    with torch.no_grad():
        logp_t = trainer._get_per_token_logps_and_entropies(model, ids, mask, L)[0]
    adv_t = inputs["advantages"].float()

    m = resp_mask.bool()
    names = sorted(set(grads_o) & set(grads_t))
    if set(grads_o) != set(grads_t):
        raise RuntimeError(f"parameter names differ: {sorted(set(grads_o) ^ set(grads_t))[:4]} ...")
    grad_diff = max(float((grads_o[n] - grads_t[n]).abs().max()) for n in names)
    grad_scale = max(float(grads_t[n].abs().max()) for n in names)
    ratio = torch.exp(logp_o - old)[m]
    out: dict[str, Any] = {
        "loss_type": loss_type,
        "aggregation": LOSS_TYPES[loss_type],
        "loss_ours": loss_o,
        "loss_trl": loss_t,
        "loss_diff": abs(loss_o - loss_t),
        "grad_max_abs_diff": grad_diff,
        "grad_max_abs": grad_scale,
        "logp_max_abs_diff": float((logp_o - logp_t)[m].abs().max()),
        "advantage_max_abs_diff": float((adv_o - adv_t[:, None].expand_as(adv_o))[m].abs().max()),
        "advantage_max_abs": float(adv_o[m].abs().max()),
        "reward_max_abs_diff": float((rewards_o - torch.tensor(reward_t.last)).abs().max()),
        "clipped_tokens": int(
            ((ratio < 1 - epsilon) | (ratio > 1 + (epsilon_high or epsilon))).sum()
        ),
        "tokens": int(m.sum()),
        "batch": B,
    }
    if behavior is not None:  # the pi / mu ratios the correction saw (do they reach the cap?)
        rho = torch.exp(logp0 - behavior)[m]
        seq = torch.exp(((logp0 - behavior) * resp_mask).sum(1))
        out |= {"behavior_token_ratio_max": float(rho.max())}
        out |= {
            "behavior_seq_ratio_max": float(seq.max()),
            "behavior_seq_ratio_min": float(seq.min()),
        }
    out["passed"] = bool(out["loss_diff"] <= 1e-5 and out["grad_max_abs_diff"] <= 1e-5)
    del trainer
    return out


def bench_numerics(
    *,
    loss_types: tuple[str, ...] = tuple(LOSS_TYPES),
    group: int = 4,
    length: int = 6,
    n_prompts: int = 4,
    model_size: tuple[int, int] = (2, 32),
    seed: int = 0,
    offpolicy: bool = True,
    log: Any = print,
) -> dict[str, Any]:
    """:func:`compare_loss_type` for each loss type TRL and we both implement (CPU), then
    (``offpolicy``) the GSPO, CISPO and importance-sampling rows of
    :mod:`llm_mdp.bench.vs_trl_offpolicy`."""
    tt = text_task(length, n_prompts=n_prompts, seed=seed)
    rows = []
    with tempfile.TemporaryDirectory(prefix="llm-mdp-numerics-") as tmp, quiet():
        folder = Path(tmp) / "model"
        save_model(folder, tt, model_size, seed, max_positions=len(tt.prompts[0]) + length + 8)
        for lt in loss_types:
            r = compare_loss_type(lt, folder=folder, tt=tt, group=group, length=length, seed=seed)
            log(
                f"  numerics {lt:<8} ({r['aggregation']}): |loss diff| {r['loss_diff']:.1e}, "
                f"max |grad diff| {r['grad_max_abs_diff']:.1e} (max |grad| "
                f"{r['grad_max_abs']:.1e}), {r['clipped_tokens']}/{r['tokens']} tokens clipped: "
                f"{'PASS' if r['passed'] else 'FAIL'}"
            )
            rows.append(r)
        if offpolicy:
            from llm_mdp.bench.vs_trl_offpolicy import compare_offpolicy_rows

            for r in compare_offpolicy_rows(
                folder=folder, tt=tt, group=group, length=length, seed=seed
            ):
                log(
                    f"  numerics {r['loss_type']:<20}: |loss diff| {r['loss_diff']:.1e}, max |grad "
                    f"diff| {r['grad_max_abs_diff']:.1e}: {'PASS' if r['passed'] else 'FAIL'}"
                )
                rows.append(r)
    return {
        "rows": rows,
        "passed": all(r["passed"] for r in rows),
        "tolerance": 1e-5,
        "settings": {
            "group": group,
            "length": length,
            "prompts": n_prompts,
            "beta": 0.04,
            "epsilon": 0.2,
            "epsilon_high": 0.28,
            "model": f"gpt2 {model_size[0]}x{model_size[1]}",
        },
    }
