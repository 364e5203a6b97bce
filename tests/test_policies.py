"""Policies: KV-cached acting == teacher-forced log-probs, sampler law, tabular nodes."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from llm_mdp.policies import (
    CausalLMPolicy,
    Policy,
    TabularPolicy,
    sample_categorical,
    sample_from_logits,
    tiny_gpt2,
    tiny_llama,
)

PAD, EOS, VOCAB = 0, 1, 48


class FakeLayout:
    """The vector env's observation layout, simulated without the env module.

    Prompt right-aligned in ``[0, P)``, response left-aligned in ``[P, W)``. A row stops at
    EOS or at its own cap (so rows stop at different steps); stopped rows are frozen.
    """

    def __init__(self, P: int, R: int, prompts, prefixes, caps, eos: int | None = EOS):
        self.P, self.R, self.eos = P, R, eos
        B = len(prompts)
        self.ids = torch.full((B, P + R), PAD, dtype=torch.long)
        self.mask = torch.zeros((B, P + R), dtype=torch.long)
        self.lens = [0] * B
        self.caps = list(caps)
        self.done = [False] * B
        for b in range(B):
            self.set_row(b, prompts[b], prefixes[b])

    def set_row(self, b: int, prompt, prefix) -> None:
        P = self.P
        self.ids[b] = PAD
        self.mask[b] = 0
        self.ids[b, P - len(prompt) : P] = torch.tensor(prompt)
        self.mask[b, P - len(prompt) : P] = 1
        self.ids[b, P : P + len(prefix)] = torch.tensor(prefix, dtype=torch.long)
        self.mask[b, P : P + len(prefix)] = 1
        self.lens[b] = len(prefix)
        self.done[b] = len(prefix) >= self.caps[b]

    def obs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids.clone(), "attention_mask": self.mask.clone()}

    def step(self, actions: torch.Tensor) -> None:
        for b, a in enumerate(actions.tolist()):
            if self.done[b]:
                continue
            self.ids[b, self.P + self.lens[b]] = a
            self.mask[b, self.P + self.lens[b]] = 1
            self.lens[b] += 1
            self.done[b] = self.lens[b] >= self.caps[b] or a == self.eos


def rollout(policy, env: FakeLayout, *, greedy=False, change=None):
    """Run to the end; return per-position act log-probs ``(B, R)`` and the last state.

    ``change = (step, row, prompt, prefix)`` resets one row mid-way (a re-prefill).
    """
    rec = torch.zeros(env.ids.shape[0], env.R)
    state, t = None, 0
    while not all(env.done):
        if change is not None and t == change[0]:
            env.set_row(change[1], change[2], change[3])
            rec[change[1]] = 0
        actions, logp, state = policy.act(env.obs(), state, greedy=greedy)
        assert actions.shape == logp.shape == (env.ids.shape[0],)
        for b in range(len(env.done)):
            if not env.done[b]:
                rec[b, env.lens[b]] = logp[b]
        env.step(actions)
        t += 1
    return rec, state


PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [15], [16, 17, 18, 19, 20]]
PREFIXES = [[], [21, 22], [], [23, 24, 25, 26]]
CAPS = [10, 6, 3, 10]  # rows stop at different steps; row 3 starts 4 tokens in


def _layout():
    return FakeLayout(P=7, R=10, prompts=PROMPTS, prefixes=PREFIXES, caps=CAPS, eos=None)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def policy(request):
    build = tiny_gpt2 if request.param == "gpt2" else tiny_llama
    model = build(
        VOCAB, n_embd=32, n_head=4, seed=3, pad_token_id=PAD, eos_token_id=EOS, init_std=0.2
    )
    return CausalLMPolicy(model, temperature=0.7, seed=0)


def _unpadded_log_probs(policy: CausalLMPolicy, ids, mask, P) -> torch.Tensor:
    """Per-row forward on the unpadded token list: the reference for positions."""
    out = torch.zeros(ids.shape[0], ids.shape[1] - P)
    for b in range(ids.shape[0]):
        real = ids[b][mask[b].bool()]
        n_resp = int(mask[b, P:].sum())
        if n_resp == 0:
            continue
        with torch.no_grad():
            logits = policy.model(real.unsqueeze(0)).logits[0] / policy.temperature
        logp = torch.log_softmax(logits, -1)[:-1].gather(-1, real[1:, None])[:, 0]
        out[b, :n_resp] = logp[-n_resp:]
    return out


def test_kv_cache_matches_teacher_forcing(policy):
    env = _layout()
    rec, state = rollout(policy, env)
    assert state.prefills == 1  # every step after the first used the KV cache
    assert env.lens == [10, 6, 3, 10]
    with torch.no_grad():
        full = policy.log_probs(env.ids, env.mask, env.P)
    resp_mask = env.mask[:, env.P :].bool()
    generated = torch.zeros_like(resp_mask)
    for b, start in enumerate(PREFIXES):
        generated[b, len(start) : env.lens[b]] = True
    assert full.shape == (4, 10)
    assert (full[~resp_mask] == 0).all()
    assert (full[resp_mask] < 0).all()
    assert (rec[generated] - full[generated]).abs().max().item() < 1e-5
    ref = _unpadded_log_probs(policy, env.ids, env.mask, env.P)
    assert (ref - full).abs().max().item() < 1e-5


def test_reprefill_when_a_row_is_reset(policy):
    env = _layout()
    new_prompt, new_prefix = [30, 31, 32, 33, 34, 35], [36]
    rec, state = rollout(policy, env, change=(2, 0, new_prompt, new_prefix))
    assert state.prefills == 2
    with torch.no_grad():
        full = policy.log_probs(env.ids, env.mask, env.P)
    assert env.ids[0, 1:7].tolist() == new_prompt and env.ids[0, 7] == 36
    generated = torch.zeros(4, 10, dtype=torch.bool)
    generated[0, 1 : env.lens[0]] = True
    for b in (1, 2, 3):
        generated[b, len(PREFIXES[b]) : env.lens[b]] = True
    assert (rec[generated] - full[generated]).abs().max().item() < 1e-5
    # a state is single-use: passing it again falls back to a prefill, same numbers
    obs = env.obs()
    _, lp1, st1 = policy.act(obs, None, greedy=True)
    _, lp2, st2 = policy.act(obs, st1, greedy=True)  # obs unchanged: all rows "frozen"
    _, lp3, st3 = policy.act(obs, st1, greedy=True)  # st1 reused: prefill
    assert st2.prefills == 1 and st3.prefills == 2
    assert torch.allclose(lp1, lp2) and torch.allclose(lp1, lp3, atol=1e-6)


def test_greedy_rollout_and_log_prob(policy):
    env = _layout()
    rec, _ = rollout(policy, env, greedy=True)
    full = policy.log_probs(env.ids, env.mask, env.P).detach()
    gen = torch.zeros(4, 10, dtype=torch.bool)
    for b, start in enumerate(PREFIXES):
        gen[b, len(start) : env.lens[b]] = True
    assert (rec[gen] - full[gen]).abs().max().item() < 1e-5
    # greedy tokens are the argmax of the unpadded forward (row 2: prompt left-padded)
    real = env.ids[2][env.mask[2].bool()]
    with torch.no_grad():
        lg = policy.model(real.unsqueeze(0)).logits[0]
    assert real[1:].tolist()[-3:] == lg[:-1].argmax(-1).tolist()[-3:]


def test_log_probs_gradients_and_entropy(policy):
    env = _layout()
    rollout(policy, env)
    policy.zero_grad()
    logp, ent = policy.log_probs_and_entropy(env.ids, env.mask, env.P)
    logp.sum().backward()
    grads = [p.grad for p in policy.parameters()]
    assert all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0
    resp = env.mask[:, env.P :].bool()
    assert (ent[~resp] == 0).all() and (ent[resp] > 0).all()
    assert ent.max().item() <= torch.log(torch.tensor(float(VOCAB))).item() + 1e-5
    policy.zero_grad()


def _chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    n = counts.sum()
    expected = probs.double() * n
    stat = ((counts.double() - expected) ** 2 / expected).sum()
    df = torch.tensor(float(len(probs) - 1), dtype=torch.float64)
    return float(torch.special.gammaincc(df / 2, stat / 2))


def test_sampler_matches_softmax_and_temperature():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2, -2.0, 0.8])
    gen = torch.Generator().manual_seed(1234)
    n = 20_000
    for temp in (1.0, 0.5):
        actions, logp = sample_from_logits(logits.expand(n, 10), temperature=temp, generator=gen)
        probs = torch.softmax(logits / temp, -1)
        counts = torch.bincount(actions, minlength=10)
        assert _chi2_pvalue(counts, probs) > 1e-3
        assert torch.allclose(logp, probs.log()[actions])
    # temperature 0.5 vs the untempered law: clearly rejected
    actions, _ = sample_from_logits(logits.expand(n, 10), temperature=0.5, generator=gen)
    assert _chi2_pvalue(torch.bincount(actions, minlength=10), torch.softmax(logits, -1)) < 1e-6
    # greedy = argmax, log-prob under the tempered law
    a, lp = sample_from_logits(logits.expand(3, 10), temperature=0.5, greedy=True)
    assert a.tolist() == [0, 0, 0]
    assert torch.allclose(lp, torch.log_softmax(logits / 0.5, -1)[0].expand(3))
    # zero-probability tokens are never drawn; same seed, same draws
    masked = torch.tensor([[0.0, 0.3, 0.0, 0.7, 0.0]]).expand(n, 5)
    draws = sample_categorical(masked, torch.Generator().manual_seed(0))
    assert set(draws.unique().tolist()) == {1, 3}
    assert torch.equal(draws, sample_categorical(masked, torch.Generator().manual_seed(0)))
    # the two-level CDF (CPU, large vocabularies): mass on 10 tokens spread over blocks,
    # incl. block edges and the ragged tail; every other token has probability 0
    support = torch.tensor([0, 255, 256, 1000, 2047, 2048, 3000, 4095, 4096, 4999])
    big = torch.zeros(5000)
    big[support] = torch.softmax(logits, -1)
    draws = sample_categorical(big.expand(n, 5000), torch.Generator().manual_seed(3), blocked=True)
    assert bool(torch.isin(draws, support).all())
    counts = torch.bincount(draws, minlength=5000)[support]
    assert _chi2_pvalue(counts, torch.softmax(logits, -1)) > 1e-3
    with pytest.raises(ValueError, match="temperature"):
        sample_from_logits(logits[None], temperature=0.0)


def test_policy_seed_reproducible():
    model = tiny_gpt2(VOCAB, n_embd=32, seed=1)
    pol = CausalLMPolicy(model)
    assert isinstance(pol, Policy)
    assert pol.vocab_size == VOCAB and pol.device.type == "cpu"
    outs = []
    for _ in range(2):
        pol.seed(7)
        rec, _ = rollout(pol, _layout())
        outs.append(rec)
    assert torch.equal(outs[0], outs[1])
    small = CausalLMPolicy(model, vocab_size=20)
    a, _, _ = small.act(_layout().obs())
    assert small.vocab_size == 20 and int(a.max()) < 20
    with pytest.raises(ValueError, match="vocab_size"):
        CausalLMPolicy(model, vocab_size=VOCAB + 1)


def test_tabular_nodes_and_act_log_probs_agree():
    a, b, eos = 0, 1, 2
    prompts = [(a,), (b, a)]
    pol = TabularPolicy(3, eos, horizon=4, prompts=prompts, seed=0, temperature=0.8)
    assert isinstance(pol, Policy)
    assert len(pol.nodes(prompts[0])) == 15 and pol.num_nodes == 30
    assert pol.logits.shape == (30, 3)
    assert pol.nodes()[pol.node_index((b, a), (a, b))] == ((b, a), (a, b))
    with pytest.raises(KeyError):
        pol.node_index((a,), (a, eos))
    with pytest.raises(KeyError):
        pol.node_index((a,), (a, a, a, a))
    for prompt_width in (None, 2):
        pol.prompt_width = prompt_width
        pol.seed(5)
        env = FakeLayout(
            P=2,
            R=4,
            prompts=[[a], [b, a], [a], [b, a]],
            prefixes=[[], [a], [b, b, a], []],
            caps=[4, 4, 4, 4],
            eos=eos,
        )
        env.ids[env.mask == 0] = 7  # pad id outside the vocabulary: must be ignored
        rec, state = rollout(pol, env)
        assert state == 2
        logp = pol.log_probs(env.ids, env.mask, 2)
        gen = torch.zeros(4, 4, dtype=torch.bool)
        for r, start in enumerate([0, 1, 3, 0]):
            gen[r, start : env.lens[r]] = True
        assert (rec[gen] - logp[gen]).abs().max().item() < 1e-6
        assert (logp[env.mask[:, 2:] == 0] == 0).all()
    # the exact per-node law: log_probs of a known sequence = sum of table entries
    ids = torch.tensor([[7, a, b, eos, 7, 7]])
    mask = torch.tensor([[0, 1, 1, 1, 0, 0]])
    lp = pol.log_probs(ids, mask, 2)
    table = pol.node_log_probs()
    expect = [table[pol.node_index((a,), ())][b], table[pol.node_index((a,), (b,))][eos]]
    assert torch.allclose(lp[0, :2], torch.stack(expect)) and lp[0, 2:].abs().sum() == 0
    lp.sum().backward()
    assert pol.logits.grad is not None and pol.logits.grad.abs().sum() > 0
    # terminal rows (EOS seen) get EOS with log-prob 0
    act, alp, _ = pol.act({"input_ids": ids, "attention_mask": mask})
    assert act.tolist() == [eos] and alp.tolist() == [0.0]


def test_from_pretrained_local_folder(tmp_path):
    from llm_mdp.tasks.tokenizers import char_tokenizer

    tok = char_tokenizer("abcdefgh")
    eos = tok.eos_token_id
    model = tiny_llama(len(tok), n_embd=32, pad_token_id=tok.pad_token_id, eos_token_id=eos)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    pol = CausalLMPolicy.from_pretrained(str(tmp_path), device="cpu", temperature=0.5, seed=0)
    assert pol.vocab_size == len(tok) == 9 and pol.eos_token_id == eos == 0
    assert pol.tokenizer is not None and pol.temperature == 0.5
    ids = torch.tensor([tok("abc").input_ids])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ref = CausalLMPolicy(model, temperature=0.5).log_probs(ids, mask, 1)
        got = pol.log_probs(ids, mask, 1)
    assert torch.allclose(ref, got, atol=1e-6)


def test_tabular_prompt_width_inference_errors_when_ambiguous():
    a, b, eos = 0, 1, 2
    pol = TabularPolicy(3, eos, horizon=3, prompts=[(a,), (a, b)])
    ids = torch.tensor([[a, b, 7, 7]])  # (a | b) or (a b | -): both are nodes
    mask = torch.tensor([[1, 1, 0, 0]])
    with pytest.raises(ValueError, match="prompt_width"):
        pol.act({"input_ids": ids, "attention_mask": mask})
    _, _, state = pol.act({"input_ids": ids, "attention_mask": mask}, 1)
    assert state == 1
