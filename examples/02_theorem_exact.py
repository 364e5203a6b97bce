"""See the Trajectory Policy Gradient Theorem hold exactly, and which estimators are biased.

A teacher's demo (CPU, a few seconds). The small set-up of docs/theory.md#the-token-mdp: the prompt
"a", a policy over the three actions {a, b, EOS}, responses of at most 4 tokens ending
with EOS (15 of them), and *hidden* random token rewards r(s_t, w_t) ~ U(-1, 1). The
learner only sees RM(W) = sum_t gamma^(t-1) r_t. Because the tree is tiny we can
enumerate every response and compute J, grad J, V, Q and the exact mean and variance of
every estimator, in float64.

    python examples/02_theorem_exact.py                  # gamma = 1, tabular policy
    python examples/02_theorem_exact.py --gamma 0.9      # (26): ZRA + discounting is biased
    python examples/02_theorem_exact.py --policy gpt2    # a tiny transformer, all parameters

The same table comes from ``llm-mdp verify``; the bias/variance plot goes to ``--out``
(default ``runs/02_bias_variance.png``).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from llm_mdp.tasks import char_tokenizer
from llm_mdp.theory import paper_setup, plot_bias_variance, print_report, verify
from llm_mdp.theory.setups import ALPHABET


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gamma", type=float, default=1.0)
    parser.add_argument("--policy", choices=["tabular", "gpt2", "llama"], default="tabular")
    parser.add_argument(
        "--out", type=Path, default=Path("runs/02_bias_variance.png"), help="the plot (PNG)"
    )
    args = parser.parse_args()

    # 1. The exact model: every response, its probability and its reward.
    model = paper_setup(gamma=args.gamma, policy=args.policy)
    tree = model.tree
    tok = char_tokenizer(ALPHABET)  # the set-up's tokenizer: token ids -> text
    print(f"{tree.describe()}; J = E RM(W) = {model.J:.6f}\n")
    print("a few responses:  P(W)     RM(W)")
    for i in range(0, tree.num_responses, 4):
        text = "".join(tok.convert_ids_to_tokens(list(tree.responses[i][1])))
        print(f"  {text:18s} {float(model.prob[i]):.4f}  {float(model.rewards[i]):+.4f}")

    # 2. Theorem 1 by hand: weight every token of W by RM(W) (REINFORCE). Its expectation,
    #    sum_W P(W) RM(W) sum_t grad log pi(w_t|s_t), is exactly grad J, although the true
    #    token rewards are not zero before the end and gamma may be < 1.
    reinforce = model.moments_of_weights(model.weights("reinforce"))
    gap = (reinforce.mean - model.grad_J).abs().max()
    print(f"\nTheorem 1: max |E[RM(W) sum_t grad log pi] - grad J| = {gap:.1e}")

    # 3. Theorem 2: weight token t by V(s_{t+1}) - V(s_t); the weights telescope.
    w = model.weights("theorem2")
    tele = (w.sum(1) - (model.rewards - model.prompt_value[0])).abs().max()
    print(f"Theorem 2: sum_t weight_t = RM(W) - V(prompt) for every W, to {tele:.1e}")
    thm2 = model.moments_of_weights(w)
    print(
        f"           unbiased too ({(thm2.mean - model.grad_J).abs().max():.1e}), variance "
        f"{thm2.trace_cov:.3f} vs REINFORCE {reinforce.trace_cov:.3f}"
    )

    # 4. Everything at once: the registry's estimators, groups of 4, TRePO, aggregation, KL.
    report = verify(gamma=args.gamma, policy=args.policy)
    print()
    print_report(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    print(f"bias/variance plot: {plot_bias_variance(report, args.out)}")


if __name__ == "__main__":
    main()
