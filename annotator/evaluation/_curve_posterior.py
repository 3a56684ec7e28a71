"""Posterior draws of the learning-curve parameters by grid importance sampling.

The curve is ``acc(n) = a - (a - y0) · (1 + n / n0)^(-c)``, which for fixed ``(c, n0)`` is
linear in ``(a, y0)``::

    acc(n) = a · u(n) + y0 · v(n),    v(n) = (1 + n / n0)^(-c),   u(n) = 1 - v(n)

Round ``i`` has Gaussian noise with standard deviation ``s · σ_i``. Here ``σ_i`` is the
binomial standard deviation ``sqrt(p̃ (1 - p̃) / m_i)`` of an accuracy measured on
``m_i`` images, with ``p̃ = (k_i + 2) / (m_i + 4)`` for ``k_i`` correct so that it stays
positive at 0% and 100%, and ``s >= 1`` absorbs any extra scatter. Without
evaluation-set sizes ``σ_i = 1`` and ``s > 0`` is the unknown noise level. The priors
are uniform on ``0 <= y0 < a <= 1``, uniform in ``log c`` and ``log n0`` over fixed
ranges, and ``p(s) ∝ 1 / s``.

Sampling has three steps:

1. For each ``(c, n0)`` on a grid, integrate ``(a, y0)`` over the plane and ``s`` in
   closed form (weighted linear least squares and an incomplete gamma function), and
   multiply by the probability that ``(a, y0)`` falls inside the allowed triangle. The
   grid is narrowed around the posterior mass a few times.
2. Draw grid cells from these weights, a point uniformly inside each cell, ``s`` from
   its exact conditional, and ``(a, y0)`` from the conditional Gaussian restricted to
   the triangle.
3. Weight each draw by the ratio of the exact posterior density to the density it was
   drawn from, and resample to equal weights.

Step 3 makes the draws exact up to Monte Carlo error whatever the grid resolution. The
grid only decides how efficient the draws are, which the effective sample size reports.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from scipy.special import gammainc, gammaincinv, gammaln, log_ndtr, logsumexp
from scipy.stats import truncnorm

logger = logging.getLogger(__name__)

#: Prior range of the exponent ``c``, uniform in ``log c``.
EXPONENT_RANGE = (0.01, 10.0)
#: Prior range of the offset ``n0`` in labels, uniform in ``log n0``.
#: NOTE: when the rounds do not pin ``n0`` down, as with a flat curve, the posterior of
#: the asymptote follows these ranges and forecasts far beyond the rounds depend on them.
OFFSET_RANGE = (0.01, 1e6)

_EXPONENT_CELLS = 48
_OFFSET_CELLS = 36
# Maximum number of times the grid is narrowed around the posterior mass.
_REFINEMENTS = 3
# Posterior mass that a narrowed grid must keep.
_KEPT_MASS = 1 - 1e-6
# Points of the histogram that approximates the conditional density of a.
_HISTOGRAM_BINS = 32
# Half-width of the window over a, in conditional standard deviations.
_WINDOW_SDS = 8.0
# Quantiles of s at which each grid cell's triangle probability is evaluated.
_SCALE_QUANTILES = (0.05, 0.5, 0.95)
_TINY = 1e-300


@dataclass(frozen=True)
class CurveDraws:
    """Equally weighted posterior draws, each array of shape ``(S,)``."""

    a: np.ndarray
    y0: np.ndarray
    c: np.ndarray
    n0: np.ndarray
    #: Effective sample size of the importance weights before resampling.
    effective_sample_size: float

    @property
    def b(self) -> np.ndarray:
        """Scale ``b = (a - y0) · n0^c`` of the form ``a - b · (n + n0)^(-c)``, shape ``(S,)``."""
        return (self.a - self.y0) * np.exp(self.c * np.log(self.n0))


def sample_curve_posterior(
    labels: np.ndarray,
    accuracy: np.ndarray,
    n_evaluated: np.ndarray | None,
    offset: float | None,
    n_draws: int,
    rng: np.random.Generator,
) -> CurveDraws | None:
    """Draw ``n_draws`` parameter sets from the learning-curve posterior.

    Parameters
    ----------
    labels, accuracy
        Rounds, each of shape ``(R,)`` with ``R >= 3``.
    n_evaluated
        Evaluation-set size per round, shape ``(R,)``, or None for an unknown common
        noise level.
    offset
        Fixed ``n0``, or None to sample it.
    n_draws
        Number of draws ``S``.
    rng
        Source of randomness.

    Returns
    -------
    CurveDraws or None
        None when no parameter set inside the prior explains the rounds with a finite
        density, which only happens for degenerate input.
    """
    if n_evaluated is not None:
        smoothed = (accuracy * n_evaluated + 2) / (n_evaluated + 4)
        weights = n_evaluated / (smoothed * (1 - smoothed))  # 1 / σ_i²
    else:
        weights = np.ones_like(accuracy)
    problem = _Problem(labels, accuracy, weights, scale_floor=n_evaluated is not None)

    # 1. Grid over (log c, log n0), narrowed around the posterior mass.
    log_c_range = (math.log(EXPONENT_RANGE[0]), math.log(EXPONENT_RANGE[1]))
    if offset is None:
        log_n0_range = (math.log(OFFSET_RANGE[0]), math.log(OFFSET_RANGE[1]))
        shape = (_EXPONENT_CELLS, _OFFSET_CELLS)
    else:
        log_n0_range = (math.log(offset), math.log(offset))
        shape = (_EXPONENT_CELLS * 4, 1)
    grid = _Grid(log_c_range, log_n0_range, shape, problem)
    for _ in range(_REFINEMENTS):
        narrowed = grid.narrowed()
        if narrowed is None:
            break
        grid = narrowed
    if not np.any(np.isfinite(grid.log_mass)):
        return None

    # 2. Proposals: a cell, a point in it, then s and (a, y0) from their conditionals.
    n_proposals = 2 * n_draws
    probabilities = np.exp(grid.log_mass - logsumexp(grid.log_mass))
    cell = rng.choice(probabilities.size, size=n_proposals, p=probabilities)
    log_c = grid.log_c[cell] + rng.uniform(-0.5, 0.5, n_proposals) * grid.step_c
    log_n0 = grid.log_n0[cell] + rng.uniform(-0.5, 0.5, n_proposals) * grid.step_n0
    fit = problem.linear_fit(np.exp(log_c), np.exp(log_n0))
    scale = problem.sample_scale(fit, rng)
    a, y0, log_ratio = _sample_triangle(fit, scale, rng)

    # 3. Importance weights: exact posterior density over proposal density.
    log_weight = problem.log_marginal(fit) - grid.log_mass[cell] + log_ratio
    finite = np.isfinite(log_weight)
    if not np.any(finite):
        return None
    log_weight = np.where(finite, log_weight, -np.inf)
    weight = np.exp(log_weight - log_weight[finite].max())
    effective = float(weight.sum() ** 2 / np.sum(weight**2))
    if effective < n_draws / 20:
        logger.warning(
            "learning-curve posterior has an effective sample size of %.0f from %d proposals; "
            "its intervals are noisy",
            effective,
            n_proposals,
        )

    index = _systematic_resample(weight, n_draws, rng)
    # A fixed offset is returned as given, not as exp(log(offset)) with its rounding.
    n0 = np.exp(log_n0[index]) if offset is None else np.full(n_draws, float(offset))
    return CurveDraws(
        a=a[index],
        y0=y0[index],
        c=np.exp(log_c[index]),
        n0=n0,
        effective_sample_size=effective,
    )


def curve_values(draws: CurveDraws, labels: np.ndarray) -> np.ndarray:
    """Evaluate ``acc(n)`` for every draw at ``labels`` (L,), shape ``(S, L)``."""
    v = np.exp(-draws.c[:, None] * np.log1p(labels[None, :] / draws.n0[:, None]))
    return draws.a[:, None] - (draws.a - draws.y0)[:, None] * v


def labels_for_target(draws: CurveDraws, target: float) -> np.ndarray:
    """Solve ``acc(n) = target`` for each draw, shape ``(S,)``.

    ``(1 + n / n0)^(-c) = (a - T) / (a - y0)`` gives
    ``n = n0 · (((a - y0) / (a - T))^(1/c) - 1)``. The result is ``inf`` where ``a <= T``
    and 0 where the curve starts at or above the target.
    """
    labels = np.full(draws.a.shape, np.inf)
    reachable = draws.a > target
    a = draws.a[reachable]
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        # A flat draw (y0 = a) gives log_ratio = -inf and so n = 0, which is right
        # because such a curve starts above the target.
        log_ratio = np.log(a - draws.y0[reachable]) - np.log(a - target)
        labels[reachable] = draws.n0[reachable] * np.expm1(log_ratio / draws.c[reachable])
    # A ratio that overflows means the target is out of reach in practice.
    labels[np.isnan(labels)] = np.inf
    return np.maximum(labels, 0.0)


@dataclass(frozen=True)
class _LinearFit:
    """Weighted least squares of ``(a, y0)`` for fixed ``(c, n0)``, arrays of shape ``(G,)``."""

    a: np.ndarray
    y0: np.ndarray
    # Entries of (Σ w [u v]ᵀ[u v])⁻¹. Given s, the covariance of (a, y0) is s² times it.
    inv_aa: np.ndarray
    inv_ay: np.ndarray
    inv_yy: np.ndarray
    log_det: np.ndarray
    # Half the weighted residual sum of squares at the least-squares solution.
    half_rss: np.ndarray


class _Problem:
    """Closed-form pieces of the posterior for one set of rounds."""

    def __init__(
        self, labels: np.ndarray, accuracy: np.ndarray, weights: np.ndarray, scale_floor: bool
    ) -> None:
        self.labels = labels
        self.accuracy = accuracy
        self.weights = weights
        self.scale_floor = scale_floor
        # Degrees of freedom left for s after the two linear parameters.
        self.dof = labels.size - 2

    def linear_fit(self, c: np.ndarray, n0: np.ndarray) -> _LinearFit:
        w, y = self.weights, self.accuracy
        v = np.exp(-c[:, None] * np.log1p(self.labels[None, :] / n0[:, None]))  # (G, R)
        u = 1 - v
        m_uu = (w * u * u).sum(axis=1)
        m_uv = (w * u * v).sum(axis=1)
        m_vv = (w * v * v).sum(axis=1)
        r_u = (w * u * y).sum(axis=1)
        r_v = (w * v * y).sum(axis=1)
        # A curve that is flat over the rounds makes the normal equations singular. The
        # floor avoids a division by zero, and the cell's tiny triangle probability then
        # sets its weight.
        det = np.maximum(m_uu * m_vv - m_uv**2, 1e-12 * m_uu * m_vv + _TINY)
        a = (m_vv * r_u - m_uv * r_v) / det
        y0 = (m_uu * r_v - m_uv * r_u) / det
        half_rss = 0.5 * ((w * y * y).sum() - (a * r_u + y0 * r_v))
        half_rss = np.maximum(half_rss, 1e-12 * (w * y * y).sum() + _TINY)
        return _LinearFit(
            a=a,
            y0=y0,
            inv_aa=m_vv / det,
            inv_ay=-m_uv / det,
            inv_yy=m_uu / det,
            log_det=np.log(det),
            half_rss=half_rss,
        )

    def log_marginal(self, fit: _LinearFit) -> np.ndarray:
        """Return the log density of the rounds given ``(c, n0)``, up to a constant, shape ``(G,)``.

        ``(a, y0)`` is integrated over the whole plane and ``s`` over its range. Over
        ``s >= 1``, ``∫ s^(-k-1) exp(-Q / s²) ds = ½ Γ(k/2) Q^(-k/2) · P(k/2, Q)`` with
        ``P`` the regularised lower incomplete gamma function, ``k = R - 2`` and ``Q``
        half the residual sum of squares. Without the floor on ``s`` the factor ``P`` is 1.
        """
        k_half = self.dof / 2
        log_marginal = -0.5 * fit.log_det + gammaln(k_half) - k_half * np.log(fit.half_rss)
        if self.scale_floor:
            log_marginal = log_marginal + np.log(np.maximum(gammainc(k_half, fit.half_rss), _TINY))
        return log_marginal

    def scale_quantile(self, fit: _LinearFit, probability: np.ndarray | float) -> np.ndarray:
        """Return the ``probability`` quantile of ``s`` given ``(c, n0)``, shape ``(G,)``.

        ``p(s | c, n0) ∝ s^(-k-1) exp(-Q / s²)``, so ``t = 1 / s²`` follows a
        Gamma(k/2, rate Q) distribution, truncated to ``t <= 1`` when ``s >= 1``. A
        quantile of ``s`` is the reciprocal square root of the opposite quantile of ``t``.
        """
        k_half = self.dof / 2
        upper_tail = 1.0 - np.asarray(probability, dtype=np.float64)
        if self.scale_floor:
            upper_tail = upper_tail * gammainc(k_half, fit.half_rss)
        precision = gammaincinv(k_half, upper_tail) / fit.half_rss
        if self.scale_floor:
            precision = np.minimum(precision, 1.0)
        return 1.0 / np.sqrt(np.maximum(precision, _TINY))

    def sample_scale(self, fit: _LinearFit, rng: np.random.Generator) -> np.ndarray:
        """Draw ``s`` from ``p(s | c, n0)`` by inverting its distribution function."""
        return self.scale_quantile(fit, rng.uniform(size=fit.half_rss.shape))


class _Grid:
    """Cell centres over ``(log c, log n0)`` with the log proposal mass of each cell."""

    def __init__(
        self,
        log_c_range: tuple[float, float],
        log_n0_range: tuple[float, float],
        shape: tuple[int, int],
        problem: _Problem,
    ) -> None:
        self.log_c_range = log_c_range
        self.log_n0_range = log_n0_range
        self.shape = shape
        self.problem = problem
        self.step_c = (log_c_range[1] - log_c_range[0]) / shape[0]
        self.step_n0 = (log_n0_range[1] - log_n0_range[0]) / shape[1]
        centres_c = log_c_range[0] + (np.arange(shape[0]) + 0.5) * self.step_c
        centres_n0 = log_n0_range[0] + (np.arange(shape[1]) + 0.5) * self.step_n0
        log_c, log_n0 = np.meshgrid(centres_c, centres_n0, indexing="ij")
        self.log_c = log_c.ravel()
        self.log_n0 = log_n0.ravel()

        fit = problem.linear_fit(np.exp(self.log_c), np.exp(self.log_n0))
        # Proposal mass of each cell, up to the cell area that all cells of one grid
        # share: the marginal density times the triangle probability. That probability
        # depends on s, and taking its maximum over three quantiles of s keeps the
        # proposal from starving a cell whose draws would then carry huge weights.
        log_triangle = np.max(
            [
                _log_triangle_probability(fit, problem.scale_quantile(fit, q))
                for q in _SCALE_QUANTILES
            ],
            axis=0,
        )
        self.log_mass = problem.log_marginal(fit) + log_triangle
        self.log_mass = np.where(np.isfinite(self.log_mass), self.log_mass, -np.inf)

    def narrowed(self) -> _Grid | None:
        """Return a grid over the cells that contain ``_KEPT_MASS``, or None if it would not shrink.

        The new grid must be at most half as wide as this one in at least one dimension.
        """
        if not np.any(np.isfinite(self.log_mass)):
            return None
        mass = np.exp(self.log_mass - logsumexp(self.log_mass))
        order = np.argsort(mass)[::-1]
        kept_count = int(np.searchsorted(np.cumsum(mass[order]), _KEPT_MASS)) + 1
        kept = np.zeros(mass.size, dtype=bool)
        kept[order[:kept_count]] = True
        rows, columns = np.nonzero(kept.reshape(self.shape))

        # One cell of margin on each side, so the edge of the mass stays inside.
        row_low, row_high = max(rows.min() - 1, 0), min(rows.max() + 2, self.shape[0])
        column_low, column_high = max(columns.min() - 1, 0), min(columns.max() + 2, self.shape[1])
        rows_halved = (row_high - row_low) * 2 <= self.shape[0]
        columns_halved = (column_high - column_low) * 2 <= self.shape[1]
        if not (rows_halved or columns_halved):
            return None
        log_c_range = (
            self.log_c_range[0] + row_low * self.step_c,
            self.log_c_range[0] + row_high * self.step_c,
        )
        log_n0_range = (
            self.log_n0_range[0] + column_low * self.step_n0,
            self.log_n0_range[0] + column_high * self.step_n0,
        )
        return _Grid(log_c_range, log_n0_range, self.shape, self.problem)


def _log_triangle_probability(fit: _LinearFit, scale: np.ndarray) -> np.ndarray:
    """Return ``log P(0 <= y0 <= a <= 1)`` for ``(a, y0) ~ N(fit, s² · inv)``, shape ``(G,)``.

    The probability is ``∫_0^1 φ_a(a) · [Φ(z_high(a)) - Φ(z_low(a))] da`` with ``y0 | a``
    Gaussian, integrated by the midpoint rule over a window around the mean of ``a``.
    """
    nodes, log_density = _conditional_a_density(fit, scale)  # (G, H) each
    width = nodes[:, 1] - nodes[:, 0]
    return logsumexp(log_density, axis=1) + np.log(width)


def _conditional_a_density(
    fit: _LinearFit, scale: np.ndarray, a: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Return bin midpoints over ``a`` and ``log[φ_a(a) · (Φ(z_high) - Φ(z_low))]`` there.

    With ``a`` given, evaluate the log density at those points instead, shape ``(G, 1)``.
    """
    sd_a = scale * np.sqrt(fit.inv_aa)
    if a is None:
        low, high = _window(fit.a, sd_a)
        fraction = (np.arange(_HISTOGRAM_BINS) + 0.5) / _HISTOGRAM_BINS
        points = low[:, None] + (high - low)[:, None] * fraction[None, :]
    else:
        points = a[:, None]

    # y0 | a ~ N(mean_y, sd_y²) with mean_y linear in a.
    slope = fit.inv_ay / fit.inv_aa
    mean_y = fit.y0[:, None] + slope[:, None] * (points - fit.a[:, None])
    sd_y = (
        scale[:, None]
        * np.sqrt(np.maximum(fit.inv_yy - fit.inv_ay**2 / fit.inv_aa, 1e-300))[:, None]
    )
    log_mass_y = _log_normal_mass((0.0 - mean_y) / sd_y, (points - mean_y) / sd_y)

    z_a = (points - fit.a[:, None]) / sd_a[:, None]
    log_density_a = -0.5 * z_a**2 - np.log(sd_a[:, None]) - 0.5 * math.log(2 * math.pi)
    return points, log_density_a + log_mass_y


def _window(mean: np.ndarray, sd: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return the interval of ``a`` in ``[0, 1]`` that proposals cover, shape ``(G,)`` each.

    The interval spans ``_WINDOW_SDS`` standard deviations of the Gaussian of ``a`` on each
    side of its mean. When the mean lies far outside ``[0, 1]`` the mass inside sits
    against the nearest end, so the window covers the ``_WINDOW_SDS`` standard deviations
    next to that end. Mass of ``a`` outside the window is never proposed, which is
    negligible unless the constraint ``y0 <= a`` pulls ``a`` that far from its mean.
    """
    low = np.clip(mean - _WINDOW_SDS * sd, 0.0, 1.0)
    high = np.clip(mean + _WINDOW_SDS * sd, 0.0, 1.0)
    empty = high - low < 1e-12
    span = np.minimum(_WINDOW_SDS * sd, 1.0)
    above = empty & (mean > 1)
    below = empty & (mean < 0)
    low = np.where(above, 1.0 - span, low)
    high = np.where(above, 1.0, high)
    low = np.where(below, 0.0, low)
    high = np.where(below, span, high)
    return low, np.maximum(high, low + 1e-12)


def _sample_triangle(
    fit: _LinearFit, scale: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw ``(a, y0)`` inside the triangle, one per row of ``fit``.

    ``a`` comes from a histogram of its restricted marginal density and ``y0 | a`` from
    the truncated Gaussian on ``[0, a]``. The third output is
    ``log[φ_a(a) · (Φ(z_high) - Φ(z_low))] - log p_hist(a)``, the importance-weight factor
    that corrects for the histogram.
    """
    size = fit.a.size
    nodes, log_density = _conditional_a_density(fit, scale)  # (N, H)
    width = nodes[:, 1] - nodes[:, 0]
    log_bin_mass = log_density - logsumexp(log_density, axis=1, keepdims=True)
    bin_probability = np.exp(log_bin_mass)
    cumulative = np.cumsum(bin_probability, axis=1)
    uniform = rng.uniform(size=size) * cumulative[:, -1]
    bin_index = np.minimum((cumulative < uniform[:, None]).sum(axis=1), _HISTOGRAM_BINS - 1)
    rows = np.arange(size)
    a = nodes[rows, bin_index] + rng.uniform(-0.5, 0.5, size) * width
    # A strictly positive a keeps the interval [0, a] of y0 non-empty.
    a = np.clip(a, 1e-12, 1.0)
    log_proposal_a = log_bin_mass[rows, bin_index] - np.log(width)
    _, log_target_a = _conditional_a_density(fit, scale, a)

    slope = fit.inv_ay / fit.inv_aa
    mean_y = fit.y0 + slope * (a - fit.a)
    sd_y = scale * np.sqrt(np.maximum(fit.inv_yy - fit.inv_ay**2 / fit.inv_aa, 1e-300))
    low_z = (0.0 - mean_y) / sd_y
    high_z = (a - mean_y) / sd_y
    y0 = mean_y + sd_y * truncnorm.ppf(rng.uniform(size=size), low_z, high_z)
    y0 = np.clip(y0, 0.0, a)
    return a, y0, log_target_a[:, 0] - log_proposal_a


def _log_normal_mass(low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Return ``log(Φ(high) - Φ(low))`` for ``low <= high``, accurate in both tails."""
    # In the upper tail Φ(high) - Φ(low) = Φ(-low) - Φ(-high), which keeps precision.
    upper = low > 0
    first = np.where(upper, -low, high)
    second = np.where(upper, -high, low)
    log_first = log_ndtr(first)
    log_second = log_ndtr(second)
    with np.errstate(divide="ignore"):
        return log_first + np.log1p(-np.exp(np.minimum(log_second - log_first, 0.0)))


def _systematic_resample(weight: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    cumulative = np.cumsum(weight) / weight.sum()
    positions = (rng.uniform() + np.arange(count)) / count
    return np.minimum(np.searchsorted(cumulative, positions), weight.size - 1)
