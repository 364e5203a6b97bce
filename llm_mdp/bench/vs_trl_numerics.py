"""Our GRPO loss and gradient against TRL's own ``_compute_loss`` on one fixed batch.

The matched settings are those of :mod:`llm_mdp.bench.vs_trl` (its module docstring
has the table); here both sides score the *same* completions, so the loss and every
parameter gradient must agree to float round-off, for each TRL ``loss_type`` (and, in
:mod:`llm_mdp.bench.vs_trl_offpolicy`, GSPO, CISPO and TRL's importance-sampling
corrections).
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any

import torch

from llm_mdp.agents import GRPO, Rollout
from llm_mdp.bench.common import TextTask, quiet, text_task
from llm_mdp.bench.vs_trl import LOSS_TYPES, Matched, load_model, make_trainer, save_model
from llm_mdp.envs import LLMTokenVectorEnv
from llm_mdp.policies import CausalLMPolicy
from llm_mdp.tasks import ResponseBatch
from llm_mdp.tasks.tokenizers import char_tokenizer


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
    log-probs (``sampling_per_token_logps``), we as ``Rollout.behavior_logp``.
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
        ref_logp=ref,
        behavior_logp=behavior,
    )
    adv_o = agent.advantages(batch).float()
    batch.advantages = adv_o
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
