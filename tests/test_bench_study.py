"""The simulation summary behind the strategy table in docs/benchmarks.md."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from annotator.bench.study import labels_to_reach, summarize, to_markdown
from annotator.errors import InputError


def _results() -> pd.DataFrame:
    rows = []
    curves = {"random": [0.5, 0.6, 0.7], "bald": [0.5, 0.7, 0.8], "slow": [0.5, 0.55, 0.6]}
    for strategy, accuracy in curves.items():
        for seed in (0, 1):
            for labels, value in zip((0, 10, 20), accuracy, strict=True):
                rows.append(
                    {"strategy": strategy, "seed": seed, "labels_spent": labels,
                     "accuracy": value, "ece": 0.1, "map_ece": 0.2, "ood_auroc": float("nan")}
                )  # fmt: skip
    return pd.DataFrame(rows)


def test_labels_to_reach_interpolates() -> None:
    curve = pd.Series([0.5, 0.6, 0.8], index=[0, 10, 20])

    assert labels_to_reach(curve, 0.7) == pytest.approx(15.0)
    assert labels_to_reach(curve, 0.5) == 0.0
    assert math.isnan(labels_to_reach(curve, 0.9))


def test_summary_ratios_against_random() -> None:
    summary = summarize(_results()).set_index("strategy")

    assert summary.loc["random", "labels_ratio"] == pytest.approx(1.0)
    assert summary.loc["bald", "labels_ratio"] == pytest.approx(0.5)
    assert math.isnan(summary.loc["slow", "labels_ratio"])
    assert summary.loc["bald", "accuracy_20"] == pytest.approx(0.8)
    assert "ood_auroc_0" not in summary.columns


def test_markdown_marks_unreached() -> None:
    text = to_markdown(summarize(_results()))

    assert "not reached" in text
    assert text.splitlines()[1].startswith("| ---")


def test_summary_needs_random() -> None:
    frame = _results()

    with pytest.raises(InputError, match="no 'random' runs"):
        summarize(frame[frame["strategy"] != "random"])
