"""Markdown tables of benchmark results, as pasted into docs/benchmarks.md."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pandas as pd


def markdown_table(frame: pd.DataFrame, format_cell: Callable[[str, Any], str]) -> str:
    """Render ``frame`` as a Markdown table, each cell through ``format_cell(column, value)``."""
    lines = [
        "| " + " | ".join(frame.columns) + " |",
        "| " + " | ".join("---" for _ in frame.columns) + " |",
    ]
    for row in frame.itertuples(index=False):
        cells = [format_cell(name, value) for name, value in zip(frame.columns, row, strict=True)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
