"""How ``llm-mdp verify`` shows a :class:`~llm_mdp.theory.report.VerifyReport`.

:func:`format_report` (plain text), :func:`print_report` (a ``rich`` table when
available), :func:`plot_bias_variance` (the plot, drawn by :mod:`llm_mdp.plotting`) and
:func:`verify_cli`, the command.
"""

from __future__ import annotations

import os
import shutil
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from llm_mdp import plotting

from .report import EstimatorRow, VerifyReport

__all__ = ["format_report", "output_width", "plot_bias_variance", "print_report", "verify_cli"]


def _fmt_err(x: float) -> str:
    return f"{x:.1e}"


def _mark(passed: bool | None) -> str:
    return {True: "ok", False: "FAIL", None: "-"}[passed]


def _tables(report: VerifyReport) -> tuple[str, list[tuple[str, list[str], list[list[str]]]]]:
    s = report.setup
    title = (
        f"llm-mdp verify{'' if s.setup == 'paper' else ' (' + s.setup + ')'}: {s.policy} policy ({s.num_params} parameters), {s.num_responses} "
        f"responses ({s.length_cap}, H={s.horizon}), gamma={s.gamma}, G={s.group_size}, "
        f"seed={s.seed}: J={s.J:.6f}, |grad J|={s.grad_norm:.4f}, {s.seconds:.1f} s"
    )
    tables = []
    tables.append(
        (
            "Exact identities",
            ["identity", "max |error|", "check"],
            [[r.identity, _fmt_err(r.max_abs_error), _mark(r.passed)] for r in report.identities],
        )
    )
    head = ["section", "estimator", "expected", "method", "max|E g - grad J|", "cosine",
            "projection", "tr Cov (draw)", "tr Cov / resp", "check"]  # fmt: skip
    body = []
    for r in report.rows:
        method = r.method
        if r.method == "monte-carlo":
            method = f"mc n={r.num_draws} z={r.z_max:.1f}"
        elif r.method == "enumerated":
            method = f"{r.num_draws} " + ("groups" if r.n_responses > 1 else "responses")
        body.append(
            [
                r.section,
                r.estimator,
                r.expected.replace("scaled x", "x"),
                method,
                _fmt_err(r.max_abs_error),
                f"{r.cosine:.4f}",
                f"{r.projection:.4f}",
                f"{r.trace_cov:.4f}",
                f"{r.trace_cov_per_response:.4f}",
                _mark(r.passed),
            ]
        )
    tables.append(("Gradient estimators vs exact grad J", head, body))
    if report.kl:
        kl_head = ["estimator", "placement", "E sum_t k", "exact KL", "value error",
                   "max|E g - grad KL|", "cosine", "projection", "expected", "check"]  # fmt: skip
        kl_body = [
            [
                r.estimator,
                r.placement,
                f"{r.expected_value:.6f}",
                f"{r.exact_kl:.6f}",
                _fmt_err(r.value_error),
                _fmt_err(r.grad_max_abs_error),
                f"{r.grad_cosine:.4f}",
                f"{r.grad_projection:.4f}",
                r.expected,
                _mark(r.passed),
            ]
            for r in report.kl
        ]
        tables.append(("KL(pi || pi_ref) estimators", kl_head, kl_body))
    return title, tables


def format_report(report: VerifyReport, width: int | None = None) -> str:
    """Plain-text rendering of the report, lines at most ``width`` characters (``None``:
    no limit). A table wider than that is cut into column groups that repeat its leading
    (name) columns; a line can exceed ``width`` only when the name columns and one more
    do."""
    title, tables = _tables(report)
    out = [title] if width is None else textwrap.wrap(title, width)
    for name, head, body in tables:
        widths = [
            max(len(h), *(len(row[i]) for row in body)) if body else len(h)
            for i, h in enumerate(head)
        ]
        groups = _column_groups(widths, width, keep=_key_columns(head))
        for k, cols in enumerate(groups):
            out.append("")
            out.append(name if len(groups) == 1 else f"{name} ({k + 1}/{len(groups)})")
            out.append("  ".join(head[i].ljust(widths[i]) for i in cols).rstrip())
            out.append("  ".join("-" * widths[i] for i in cols))
            out.extend("  ".join(row[i].ljust(widths[i]) for i in cols).rstrip() for row in body)
    out.append("")
    out.append("all checks passed" if report.passed else "SOME CHECKS FAILED")
    return "\n".join(out)


def _key_columns(head: Sequence[str]) -> int:
    """How many leading columns name a row (repeated in every column group)."""
    return 2 if len(head) > 1 and head[1] in ("estimator", "placement") else 1


def _column_groups(widths: Sequence[int], width: int | None, keep: int) -> list[list[int]]:
    """Split column indices into groups whose joined width (2 spaces apart) fits ``width``;
    each group starts with the first ``keep`` columns."""
    every = list(range(len(widths)))
    if width is None or sum(widths) + 2 * (len(widths) - 1) <= width:
        return [every]
    groups: list[list[int]] = []
    current = every[:keep]
    for i in every[keep:]:
        if len(current) > keep and sum(widths[j] + 2 for j in current) + widths[i] > width:
            groups.append(current)
            current = every[:keep]
        current = [*current, i]
    groups.append(current)
    return groups


def output_width(stream: TextIO) -> int | None:
    """The width to fit output to: the terminal's (or ``$COLUMNS``) when ``stream`` is a
    terminal or ``COLUMNS`` is set, else ``None`` (a file or pipe: no limit)."""
    isatty = getattr(stream, "isatty", None)
    if (callable(isatty) and isatty()) or "COLUMNS" in os.environ:
        return shutil.get_terminal_size().columns
    return None


def print_report(
    report: VerifyReport,
    file: TextIO | None = None,
    *,
    plain: bool = False,
    width: int | None = None,
) -> None:
    """Print the report: a ``rich`` table when ``rich`` is importable, else plain text.

    Lines fit ``width`` (default: :func:`output_width` of the stream, so a terminal's
    width; no limit for a file or pipe).
    """
    stream = file if file is not None else sys.stdout
    width = width if width is not None else output_width(stream)
    try:
        if plain:
            raise ImportError
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table
    except ImportError:
        print(format_report(report, width), file=stream)
        return
    console = Console(file=stream, width=width or 1000)  # a file: a width no table reaches
    title, tables = _tables(report)
    console.print(title)
    for name, head, body in tables:
        widths = [max(len(h), *(len(row[i]) for row in body)) for i, h in enumerate(head)]
        # a rich column takes its text + 3 (padding, rule); cut into groups, never squeeze
        # numbers into "0.10…"
        limit = None if width is None else width - 3
        groups = _column_groups([w + 1 for w in widths], limit, keep=_key_columns(head))
        for k, cols in enumerate(groups):
            label = name if len(groups) == 1 else f"{name} ({k + 1}/{len(groups)})"
            table = Table(title=label, title_justify="left")
            for i in cols:
                left = head[i] in ("section", "estimator", "identity")
                table.add_column(head[i], justify="left" if left else "right")
            for row in body:
                style = "red" if row[-1] == "FAIL" else None
                table.add_row(*(escape(row[i]) for i in cols), style=style)
            console.print(table)
    console.print("all checks passed" if report.passed else "[red]SOME CHECKS FAILED[/red]")


def plot_bias_variance(rows: Sequence[EstimatorRow] | VerifyReport, path: str | Path) -> Path:
    """Save the bias/variance PNG of ``rows`` (or a report's rows), see
    :func:`llm_mdp.plotting.plot_bias_variance`."""
    items = rows.rows if isinstance(rows, VerifyReport) else list(rows)
    return plotting.plot_bias_variance(items, path)


# ----------------------------------------------------------------------------- CLI


def verify_cli(argv: list[str] | None = None) -> int:
    """``llm-mdp verify ARGS`` (its options and checks live in :mod:`llm_mdp.cli.verify`)."""
    from llm_mdp.cli import main

    return main(["verify", *(sys.argv[1:] if argv is None else argv)])
