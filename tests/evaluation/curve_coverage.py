"""Measure how often the learning-curve forecast intervals cover the true label count.

Run from the repository root::

    .venv/bin/python -m tests.evaluation.curve_coverage --repetitions 40

For each scenario it simulates rounds from ``acc(n) = a - (a - y0)(1 + n / n0)^(-c)``
with binomial evaluation noise, forecasts the labels needed for a target accuracy, and
counts how often the 95% interval contains the true count. It compares three variants
of :class:`annotator.evaluation.curve.LearningCurve` (offset inferred, offset fixed at 1,
no evaluation-set sizes) with a baseline: a least-squares fit of the same four
parameters by ``scipy.optimize.curve_fit`` whose covariance gives Gaussian parameter
draws. The script is not part of the test suite because it takes minutes.
"""

from __future__ import annotations

import argparse
import logging
import math
import warnings

import numpy as np
from scipy.optimize import OptimizeWarning, curve_fit
from scipy.special import expit, logit

from annotator.evaluation._curve_posterior import CurveDraws, labels_for_target
from annotator.evaluation.curve import fit_learning_curve

TRUE_A, TRUE_Y0, TRUE_C = 0.92, 0.6, 0.5
# (offset n0, largest label count, target accuracy, evaluation images, rounds)
SCENARIOS = [
    (n0, largest, target, images, rounds)
    for n0 in (1.0, 10.0, 50.0)
    for largest, target, images, rounds in (
        (200, 0.89, 2000, 11),
        (400, 0.90, 5000, 11),
        (100, 0.85, 1000, 11),
        (100, 0.85, 1000, 6),
    )
]


def _least_squares_draws(
    labels: np.ndarray, accuracy: np.ndarray, images: np.ndarray, rng: np.random.Generator
) -> CurveDraws | None:
    """Fit θ = (logit a, logit(y0 / a), log c, log n0) by weighted least squares.

    Returns draws from ``N(θ̂, Σ)`` with ``Σ`` the fit's covariance, inflated by the reduced
    chi-square when it exceeds 1, or None when the fit fails.
    """

    def model(n: np.ndarray, *theta: float) -> np.ndarray:
        a = expit(theta[0])
        y0 = a * expit(theta[1])
        return a - (a - y0) * np.exp(-math.exp(theta[2]) * np.log1p(n / math.exp(theta[3])))

    smoothed = (accuracy * images + 2) / (images + 4)
    sigma = np.sqrt(smoothed * (1 - smoothed) / images)
    start = [logit(min(accuracy.max() + 0.02, 0.99)), logit(0.6), math.log(0.5), math.log(10.0)]
    lower = [-15.0, -15.0, math.log(1e-4), math.log(1e-3)]
    upper = [15.0, 15.0, math.log(20.0), math.log(1e7)]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", OptimizeWarning)
            theta, covariance = curve_fit(
                model,
                labels,
                accuracy,
                p0=start,
                sigma=sigma,
                absolute_sigma=True,
                bounds=(lower, upper),
                method="trf",
                max_nfev=2000,
            )
    except (RuntimeError, OptimizeWarning, ValueError):
        return None
    residual = (accuracy - model(labels, *theta)) / sigma
    covariance = covariance * max(1.0, float(residual @ residual) / (labels.size - 4))
    if not np.all(np.isfinite(covariance)):
        return None
    theta_draws = rng.multivariate_normal(theta, covariance, size=2000, method="eigh")
    a = expit(theta_draws[:, 0])
    # Wide covariances send some draws of log c and log n0 past exp's range.
    with np.errstate(over="ignore"):
        return CurveDraws(
            a=a,
            y0=a * expit(theta_draws[:, 1]),
            c=np.exp(theta_draws[:, 2]),
            n0=np.exp(theta_draws[:, 3]),
            effective_sample_size=2000.0,
        )


def _covers(draws: CurveDraws | None, target: float, true_labels: float) -> bool:
    if draws is None:
        return False
    needed = labels_for_target(draws, target)
    low, high = np.quantile(needed, [0.025, 0.975], method="inverted_cdf")
    return bool(low <= true_labels <= high)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--repetitions", type=int, default=40, help="simulated projects per scenario"
    )
    arguments = parser.parse_args()
    logging.disable(logging.WARNING)

    header = "n0  labels target images rounds  inferred  fixed-1  no-sizes  least-squares"
    print(header)
    for n0, largest, target, images, rounds in SCENARIOS:
        labels = np.linspace(0, largest, rounds)
        true_accuracy = TRUE_A - (TRUE_A - TRUE_Y0) * (1 + labels / n0) ** (-TRUE_C)
        true_labels = n0 * (((TRUE_A - TRUE_Y0) / (TRUE_A - target)) ** (1 / TRUE_C) - 1)
        counts = np.zeros(4)
        for seed in range(arguments.repetitions):
            rng = np.random.default_rng(seed)
            m = np.full(rounds, images)
            accuracy = rng.binomial(m, true_accuracy) / m
            variants = [
                fit_learning_curve(labels, accuracy, m, seed=seed).draws_,
                fit_learning_curve(labels, accuracy, m, offset=1.0, seed=seed).draws_,
                fit_learning_curve(labels, accuracy, seed=seed).draws_,
                _least_squares_draws(labels, accuracy, m.astype(float), rng),
            ]
            counts += [_covers(draws, target, true_labels) for draws in variants]
        coverage = counts / arguments.repetitions
        print(
            f"{n0:<4g}{largest:>6d} {target:>6.2f} {images:>6d} {rounds:>6d}  "
            + "  ".join(f"{value:>8.2f}" for value in coverage),
            flush=True,
        )


if __name__ == "__main__":
    main()
