"""``llm-mdp verify``: every estimator against the exact gradient of a small policy.

The options are defined here (no torch import, so ``llm-mdp --help`` stays fast) and
checked before the work: sizes first (the exact enumeration grows as ``2^H``), then the
output paths, so a bad ``--plot`` fails in a second instead of after the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from llm_mdp.cli.options import CLIError, check_writable_file, number_type
from llm_mdp.validation import Range

LENGTH_CAPS = ("force-eos", "env")  # llm_mdp.theory.tree.LENGTH_CAPS (a test keeps them equal)
POLICY_KINDS = ("tabular", "gpt2", "llama")  # llm_mdp.theory.setups.POLICY_KINDS
SETUPS = ("paper", "echo")  # llm_mdp.theory.setups.SETUPS
MAX_HORIZON = 8
"""The largest ``--horizon``: 2^8 - 1 = 255 responses under force-eos (511 under env) and
covariances of a few thousand parameters; each step up doubles the responses and
quadruples the covariances (horizon 12 would need about 100 GB)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``llm-mdp verify``."""
    p.add_argument(
        "--setup",
        choices=SETUPS,
        default="paper",
        help="paper: one turn, random token rewards (docs/theory.md#the-token-mdp); echo: two "
        "turns, the environment replies a or b at random and the policy must echo it "
        "(docs/theory.md#multi-turn; needs --horizon >= 4 and gamma 1) (default paper)",
    )
    p.add_argument(
        "--gamma",
        type=number_type(float, Range(0, 1, low_open=True)),
        default=1.0,
        help="discount in (0, 1] (default 1)",
    )
    p.add_argument(
        "--horizon",
        type=number_type(int, Range(1, MAX_HORIZON)),
        default=4,
        help=f"most tokens per response, 1..{MAX_HORIZON} (default 4)",
    )
    p.add_argument(
        "--length-cap",
        choices=LENGTH_CAPS,
        default="force-eos",
        help="force-eos: every response ends with EOS within H tokens (15 responses for "
        "H=4, the paper's set-up); env: the env's rule, a capped response has no EOS (31)",
    )
    p.add_argument(
        "--group-size",
        type=number_type(int, Range(1)),
        default=4,
        help="G of the group estimators (default 4)",
    )
    p.add_argument(
        "--seed",
        type=number_type(int, Range(0)),
        default=0,
        help="seed of rewards and policy (default 0)",
    )
    p.add_argument("--policy", choices=POLICY_KINDS, default="tabular", help="(default tabular)")
    p.add_argument(
        "--mc-samples",
        type=number_type(int, Range(2)),
        default=20_000,
        help="Monte Carlo draws where groups are too many to enumerate (default 20000)",
    )
    p.add_argument(
        "--max-groups",
        type=number_type(int, Range(1)),
        default=1_000_000,
        help="enumerate up to this many ordered groups (default 1000000)",
    )
    p.add_argument("--no-kl", action="store_true", help="skip the KL rows")
    p.add_argument(
        "--off-policy",
        action="store_true",
        help="the off-policy section instead: every estimator under temperature, top-p and "
        "stale-policy sampling, corrections against their cap (uses --policy, --seed, "
        "--horizon, --plot, --json)",
    )
    p.add_argument("--plot", type=Path, metavar="PATH", help="save the bias/variance plot (PNG)")
    p.add_argument("--json", type=Path, metavar="PATH", help="write the rows as JSON")
    p.add_argument(
        "--plain", action="store_true", help="plain-text table even when rich is installed"
    )


def cmd_verify(args: argparse.Namespace) -> int:
    """Print the table; 0 when every check passed, 1 otherwise (2 on bad input)."""
    if args.plot is not None:
        check_writable_file(args.plot, "--plot")
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise CLIError("--plot needs matplotlib: pip install matplotlib") from None
    if args.json is not None:
        check_writable_file(args.json, "--json")
    if args.off_policy:
        if args.setup != "paper":
            raise CLIError(f"--off-policy runs on the paper set-up, not --setup {args.setup}")
        from llm_mdp.theory.offpolicy_report import run_offpolicy

        try:
            return run_offpolicy(
                policy=args.policy,
                seed=args.seed,
                horizon=args.horizon,
                plot=args.plot,
                json_path=args.json,
            )
        except ValueError as err:
            raise CLIError(str(err)) from None
    from llm_mdp.theory import plot_bias_variance, print_report, verify

    try:
        report = verify(
            gamma=args.gamma,
            horizon=args.horizon,
            length_cap=args.length_cap,
            group_size=args.group_size,
            seed=args.seed,
            policy=args.policy,
            mc_samples=args.mc_samples,
            max_groups=args.max_groups,
            kl=not args.no_kl,
            setup=args.setup,
        )
    except ValueError as err:
        raise CLIError(str(err)) from None
    print_report(report, plain=args.plain)
    if args.plot is not None:
        print(f"plot: {plot_bias_variance(report, args.plot)}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report.to_dict(), indent=2))
        print(f"json: {args.json}")
    sys.stdout.flush()
    return 0 if report.passed else 1
