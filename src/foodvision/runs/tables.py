"""Markdown tables of runs (``compare.py``'s leaderboard, a sweep's summary): one way to show a value."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

TEXT_COLUMNS = ("note", "error", "checkpoint", "overrides", "dir", "path")
LONG_TEXT_COLUMNS = ("note", "error")
LONG_TEXT_LIMIT = 160


def format_cell(key: str, value: Any, missing: str = "-") -> str:
    """A value as a table shows it: accuracies and losses to 4 decimals, parameters in millions, times
    and speeds to whole units, learning rates in short form; ``missing`` for none (text columns: blank)."""
    if value is None or value == "":
        return "" if key in TEXT_COLUMNS else missing
    if key in ("params_total", "params_trainable") and isinstance(value, (int, float)):
        return f"{value / 1e6:.2f}M" if value >= 1e5 else f"{value:,}"
    if isinstance(value, float):
        if key == "lr" or 0 < abs(value) < 1e-3:
            return f"{value:.3g}"
        if key.endswith(("seconds", "per_second")):
            return f"{value:.0f}" if value >= 10 else f"{value:.1f}"
        if key.endswith("_mb"):
            return f"{value:.1f}"
        return f"{value:.4f}"
    return str(value)


def markdown_table(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[str | tuple[str, str]], missing: str = "-"
) -> str:
    """``columns``: keys, or ``(key, title)`` pairs; long notes and errors are cut to 160 characters."""
    pairs = [(c, c) if isinstance(c, str) else c for c in columns]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    out = [line([title for _, title in pairs]), line(["---"] * len(pairs))]
    for row in rows:
        cells = []
        for key, _ in pairs:
            cell = format_cell(key, row.get(key), missing)
            cells.append(cell[:LONG_TEXT_LIMIT] if key in LONG_TEXT_COLUMNS else cell)
        out.append(line(cells))
    return "\n".join(out)
