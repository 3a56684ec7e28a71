"""Summaries of strategy simulations for docs/benchmarks.md.

Reads the CSV files that ``annotator simulate`` writes and reports, per strategy:

- the ECE of the BayesVLM and the MAP predictive at zero labels and at the last budget;
- the labels each strategy needs to reach the accuracy that ``random`` reaches at the
  last budget, as a ratio to that budget (below 1 is better than random);
- with a held-out class, the AUROC of the epistemic uncertainty for its images.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from annotator.bench.tables import markdown_table
from annotator.errors import InputError

REFERENCE_STRATEGY = "random"


def labels_to_reach(curve: pd.Series, target: float) -> float:
    """Return the labels at which a mean accuracy curve first reaches ``target``.

    ``curve`` is indexed by labels spent. Between rounds the curve is interpolated linearly;
    NaN when it never reaches the target.
    """
    labels = curve.index.to_numpy(dtype=np.float64)
    accuracy = curve.to_numpy(dtype=np.float64)
    for i in range(len(labels)):
        if accuracy[i] >= target:
            if i == 0:
                return float(labels[0])
            fraction = (target - accuracy[i - 1]) / (accuracy[i] - accuracy[i - 1])
            return float(labels[i - 1] + fraction * (labels[i] - labels[i - 1]))
    return float("nan")


def summarize(results: pd.DataFrame) -> pd.DataFrame:
    """Summarise a simulation in one row per strategy: accuracy, ECE and labels against random."""
    missing = {"strategy", "labels_spent", "accuracy", "ece", "map_ece"} - set(results.columns)
    if missing:
        raise InputError(f"simulation results lack the columns {sorted(missing)}")
    if REFERENCE_STRATEGY not in set(results["strategy"]):
        raise InputError("the simulation has no 'random' runs to compare against")

    means = results.groupby(["strategy", "labels_spent"]).mean(numeric_only=True)
    errors = results.groupby(["strategy", "labels_spent"])["accuracy"].sem()
    budget = int(results["labels_spent"].max())
    target = float(means.loc[(REFERENCE_STRATEGY, budget), "accuracy"])
    rows = []
    for strategy in sorted(results["strategy"].unique()):
        curve = means.loc[strategy]["accuracy"]
        needed = labels_to_reach(curve, target)
        row = {
            "strategy": strategy,
            "seeds": int(results[results["strategy"] == strategy]["seed"].nunique()),
            "accuracy_0": float(curve.loc[0]),
            f"accuracy_{budget}": float(curve.loc[budget]),
            f"accuracy_{budget}_sem": float(errors.loc[(strategy, budget)]),
            "ece_0": float(means.loc[(strategy, 0), "ece"]),
            "map_ece_0": float(means.loc[(strategy, 0), "map_ece"]),
            f"ece_{budget}": float(means.loc[(strategy, budget), "ece"]),
            f"map_ece_{budget}": float(means.loc[(strategy, budget), "map_ece"]),
            "labels_ratio": needed / budget,
        }
        if "ood_auroc" in results.columns and results["ood_auroc"].notna().any():
            row["ood_auroc_0"] = float(means.loc[(strategy, 0), "ood_auroc"])
            row[f"ood_auroc_{budget}"] = float(means.loc[(strategy, budget), "ood_auroc"])
        rows.append(row)
    return pd.DataFrame(rows)


def to_markdown(frame: pd.DataFrame) -> str:
    """Format a summary as a Markdown table, with three decimals and "not reached" for NaN ratios."""
    return markdown_table(frame, _format_summary_cell)


def _format_summary_cell(name: str, value: Any) -> str:
    if isinstance(value, float) and np.isnan(value):
        return "not reached" if name == "labels_ratio" else "n/a"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)
