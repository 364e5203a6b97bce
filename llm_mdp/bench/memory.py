"""Peak memory of one PPO, GRPO and TRePO update on the same model and batch.

Each agent runs in a fresh process (``python -m llm_mdp.bench.memory SPEC_JSON``), so
one agent's freed-but-cached memory cannot hide another's. In that process:

1. build the env, the model and the policy (what every agent shares), ``gc.collect()``;
2. return freed heap memory to the OS (glibc ``malloc_trim(0)``; after a small warm-up of
   autograd, AdamW and the sampler on dummy tensors), read the current resident set size
   (``VmRSS``) as the baseline and reset the kernel's
   high-water mark (``echo 5 > /proc/self/clear_refs`` sets ``VmHWM`` -- and so
   ``getrusage(RUSAGE_SELF).ru_maxrss`` -- back to the current RSS); on CUDA also
   ``torch.cuda.reset_peak_memory_stats()``;
3. build the agent (reference copy, critic, optimizer) and run ``steps`` updates;
4. peak = ``VmHWM`` (= ``ru_maxrss``); report ``peak - baseline``: the memory the
   algorithm adds on top of the model it trains (weights of extra networks, gradients,
   Adam moments, activations, logits, KV caches) -- and, on CUDA, ``max_memory_allocated``
   minus the allocation at the baseline.

The worker runs with ``MALLOC_MMAP_THRESHOLD_=65536`` (glibc): freed tensors go straight
back to the OS, so RSS follows live memory and repeated runs agree to ~0.1 MB (with the
default dynamic threshold, cached free blocks move the peak by ~5% between runs).
Where ``/proc/self/clear_refs`` is not writable (not Linux), the high-water mark cannot
be reset: the baseline is then ``ru_maxrss`` at step 2, so the delta is a lower bound
(anything under an earlier peak is not seen). The report says which method ran.
The analytic ``state`` column adds up the bytes of every parameter, gradient and
optimizer tensor the agent holds after the updates (no activations): a cross-check.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

import torch

KB = 1024


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _maxrss_kb() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r // KB if sys.platform == "darwin" else r  # bytes on macOS, KiB on Linux


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter to the current RSS; False where impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def peak_kb() -> int:
    hwm = _status_kb("VmHWM")
    return hwm if hwm is not None else _maxrss_kb()


def current_kb() -> int:
    rss = _status_kb("VmRSS")
    return rss if rss is not None else _maxrss_kb()


def _state_bytes(agent: Any) -> int:
    seen: set[int] = set()
    total = 0

    def add(t: torch.Tensor) -> None:
        nonlocal total
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()

    modules = list(agent.modules.values())
    if agent.ref_policy is not None:
        modules.append(agent.ref_policy)
    for m in modules:
        for p in m.parameters():
            add(p)
            if p.grad is not None:
                add(p.grad)
    for st in agent.optimizer.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                add(v)
    return total


def _warm_up(policy: Any, env: Any) -> None:
    """Touch the lazily initialised machinery (autograd engine, AdamW, the sampler, the
    KV-cache path) on small tensors, so its one-off cost is not charged to the first
    agent, without allocating anything model-sized (that would be cached and reused)."""
    obs, _ = env.reset(seed=0)
    one = {k: v[:1] for k, v in obs.items()}
    with torch.no_grad():
        policy.act(one)
        policy.log_probs(one["input_ids"], one["attention_mask"], env.P)
    dummy = torch.nn.Linear(8, 8)
    opt = torch.optim.AdamW(dummy.parameters(), lr=1e-3)
    torch.log_softmax(dummy(torch.randn(4, 8)), -1).sum().backward()
    opt.step()
    del dummy, opt


def release_free_memory() -> bool:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim``), so the baseline RSS
    counts only live memory; False where unavailable."""
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0) or True)
    except (OSError, AttributeError):
        return False


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Run in a fresh process: one agent's updates on the spec's model and batch."""
    from llm_mdp.agents import get_agent
    from llm_mdp.bench.common import wide_env_model
    from llm_mdp.envs import LLMTokenVectorEnv
    from llm_mdp.policies import CausalLMPolicy
    from llm_mdp.utils import resolve_device

    torch.set_num_threads(int(spec.get("threads", 1)))
    device = resolve_device(spec.get("device", "cpu"))
    batch, length = int(spec["batch"]), int(spec["length"])
    chunked = spec.get("chunked_head")
    if spec["model"] == "smollm2":  # SmolLM2-135M-Instruct on its chat task (offline)
        from llm_mdp.models import load_smollm2
        from llm_mdp.tasks.chat import chat_keyword_task

        model, tok = load_smollm2()
        model.to(device)
        task = chat_keyword_task(tokenizer=tok, max_response_tokens=length)
        env = LLMTokenVectorEnv(task, batch, device=device, info_text=False)
        policy = CausalLMPolicy(model, tok, vocab_size=len(tok), seed=0, chunked_head=chunked)
    else:
        vocab, model_size = int(spec["vocab"]), (int(spec["model"][0]), int(spec["model"][1]))
        env, model = wide_env_model(
            vocab, batch, length, model_size, n_prompts=64, reward="target", device=device
        )
        policy = CausalLMPolicy(model, env.tokenizer, seed=0, chunked_head=chunked)
    cls = get_agent(spec["agent"])
    config = cls.config_class.from_dict(dict(spec.get("config") or {}))
    _warm_up(policy, env)
    gc.collect()
    release_free_memory()
    base_kb = current_kb()
    method = "clear_refs" if reset_peak() else "ru_maxrss (lower bound)"
    if method != "clear_refs":
        base_kb = _maxrss_kb()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        cuda_base = torch.cuda.memory_allocated(device)
    agent = cls(env, policy, config)
    built_kb = peak_kb()
    metrics = {}
    seconds = []
    for _ in range(int(spec.get("steps", 1))):
        t0 = time.perf_counter()
        metrics = agent.train_step()
        seconds.append(time.perf_counter() - t0)
    if cuda:
        torch.cuda.synchronize()
    out = {
        "agent": spec["agent"],
        "variant": spec.get("variant", "defaults"),
        "method": method,
        "baseline_mb": base_kb / KB,
        "peak_mb": peak_kb() / KB,
        "delta_mb": (peak_kb() - base_kb) / KB,
        "build_delta_mb": (built_kb - base_kb) / KB,
        "state_mb": _state_bytes(agent) / 2**20,
        "reference_model": agent.ref_policy is not None,
        "critic": "critic" in agent.modules,
        "group_size": agent.config.group_size,
        "kl_coef": agent.config.kl_coef,
        "epochs": agent.config.epochs,
        "episodes": agent.episodes,
        "response_length": metrics.get("response/length"),
        "chunked_head": spec.get("chunked_head"),
        "update_seconds": seconds,
    }
    if cuda:
        out["cuda_peak_mb"] = (torch.cuda.max_memory_allocated(device) - cuda_base) / 2**20
    return out


def measure_in_subprocess(spec: dict[str, Any], timeout: float = 1800) -> dict[str, Any]:
    """:func:`measure` in a fresh Python process; raises with its stderr if it fails."""
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    threads = str(spec.get("threads", 1))
    env.setdefault("OMP_NUM_THREADS", threads)
    # glibc: a fixed mmap threshold (no dynamic raise) hands every freed block over 64 KiB
    # straight back to the OS, so RSS follows live tensor memory; with the default dynamic
    # threshold, freed-but-cached heap blocks make the peak vary by ~5% from run to run.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    proc = subprocess.run(
        [sys.executable, "-m", "llm_mdp.bench.memory", json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"memory worker for {spec['agent']} failed:\n{tail}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    # each agent's own defaults (GRPO beta 0.04 and PPO beta 0.05 keep a reference copy;
    # TRePO's default beta 0 keeps none)
    "defaults": {"ppo": {}, "grpo": {}, "trepo": {}},
    # every agent keeps a frozen reference model: TRePO with beta 0.04 too
    "all-with-reference": {"ppo": {}, "grpo": {}, "trepo": {"kl_coef": 0.04}},
    # each agent's defaults with the dense (B, R, V) logits instead of the chunked LM head
    "dense-head": {"ppo": {}, "grpo": {}, "trepo": {}},
    # PPO's other critics (``PPOConfig.critic``), against the ``defaults`` GRPO row
    "critics": {
        "ppo-shared": {"agent": "ppo", "critic": "shared"},
        "ppo-small": {"agent": "ppo", "critic": "small"},
    },
}
"""Variant -> label -> config fields (``"agent"`` names the agent when the label does not)."""


def bench_memory(
    *,
    vocab: int,
    model_size: tuple[int, int],
    batch: int,
    length: int,
    steps: int,
    device: torch.device,
    threads: int,
    variants: tuple[str, ...] = tuple(VARIANTS),
    log: Any = print,
) -> dict[str, Any]:
    """Every agent of every variant in its own process; ratios to GRPO per variant."""
    rows = []
    grpo_of: dict[str, dict[str, Any]] = {}
    for variant in variants:
        by_agent = {}
        for label, fields in VARIANTS[variant].items():
            config = {k: v for k, v in fields.items() if k != "agent"}
            spec = {
                "agent": fields.get("agent", label),
                "variant": variant,
                "config": config,
                "vocab": vocab,
                "model": list(model_size),
                "batch": batch,
                "length": length,
                "steps": steps,
                "device": str(device),
                "threads": threads,
                "chunked_head": False if variant == "dense-head" else None,
            }
            r = measure_in_subprocess(spec)
            r["agent"] = label
            by_agent[label] = r
            log(
                f"  memory {variant:<18} {label:<10} peak +{r['delta_mb']:8.1f} MB above the model "
                f"(state {r['state_mb']:.1f} MB, baseline {r['baseline_mb']:.0f} MB)"
            )
        grpo_of[variant] = by_agent.get("grpo") or grpo_of.get("defaults") or {}
        g = grpo_of[variant]
        if not g:
            raise ValueError(f"memory variant {variant!r} needs a GRPO row (or 'defaults' first)")
        for r in by_agent.values():
            r["grpo_delta_mb"] = g["delta_mb"]
            r["ratio_to_grpo"] = (
                r["delta_mb"] / g["delta_mb"] if g["delta_mb"] > 0 else float("nan")
            )
            r["total_ratio_to_grpo"] = r["peak_mb"] / g["peak_mb"]
            if "cuda_peak_mb" in r and g.get("cuda_peak_mb"):
                r["cuda_ratio_to_grpo"] = r["cuda_peak_mb"] / g["cuda_peak_mb"]
            rows.append(r)
    return {
        "settings": {
            "vocab": vocab,
            "model": f"gpt2 {model_size[0]}x{model_size[1]}",
            "batch": batch,
            "length": length,
            "steps": steps,
            "device": str(device),
        },
        "rows": rows,
    }


def format_memory(res: dict[str, Any]) -> str:
    lines = [
        "variant             agent       ref critic  peak above model   x GRPO   state MB   peak RSS   x GRPO"
    ]
    for r in res["rows"]:
        cuda = f"   cuda +{r['cuda_peak_mb']:.1f} MB" if "cuda_peak_mb" in r else ""
        lines.append(
            f"{r['variant']:<19} {r['agent']:<10} {'yes' if r['reference_model'] else 'no':>4} "
            f"{'yes' if r['critic'] else 'no':>6} {r['delta_mb']:>13.1f} MB {r['ratio_to_grpo']:>7.2f}x "
            f"{r['state_mb']:>10.1f} {r['peak_mb']:>8.0f} MB {r['total_ratio_to_grpo']:>6.2f}x{cuda}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m llm_mdp.bench.memory SPEC_JSON", file=sys.stderr)
        return 2
    print(json.dumps(measure(json.loads(argv[0]))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
