"""Scoring benchmark: BALD by the closed-form method against its floor and Monte Carlo.

For each pool size ``N`` and class count ``C`` the benchmark builds one zero-shot posterior
with realistic factors (see :func:`realistic_projection`) and measures, in the same run:

1. the method: :func:`~annotator.bayes.acquisition.score_pool` with BALD from the analytic
   logit moments and ``method_samples`` independent logit samples per image and class;
2. the floor: the product ``Φ C_A⁻ᵀ`` (that is ``Φ A'⁻¹`` up to a triangular factor), which
   every scoring of the pool needs, chunk by chunk;
3. the logit sampling alone: drawing ``method_samples`` logits per image for each class the
   method samples (every class, or with more than ``DEFAULT_SAMPLED_CLASSES + 1`` classes the
   most plausible ones plus one merged class), the softmax and the two entropies of BALD;
4. weight-space Monte Carlo: BALD from ``num_samples`` whole weight draws of the image
   projection, on the first ``mc_subset`` images of the pool, with its time per image.
   Drawing the weights is a one-off cost per ranking and is timed apart (``mc_draws_s``).

The target is that the method's time per image stays within 3× the floor plus the sampling,
and at least 10× below Monte Carlo. The Spearman correlation of the two BALD rankings on the
Monte Carlo subset shows how far the cheaper method changes the ranking, next to the
correlation between two Monte Carlo runs with independent draws (``spearman_mc_repeat``).

Peak memory is measured per stage as the growth above the memory in use when the stage
starts, and the pool itself is allocated before. On CUDA the peak is
``torch.cuda.max_memory_allocated``. On the CPU it is the largest anonymous resident memory
(``RssAnon`` in ``/proc/self/status``, Linux only) read every ``POLL_INTERVAL_S`` seconds by
a background thread, so a spike shorter than that can be missed. Pages that the allocator
keeps from earlier stages and reuses do not count as growth.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import math
import platform
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy import stats
from torch import Tensor

from annotator.bayes.acquisition import DEFAULT_SAMPLED_CLASSES, score_pool
from annotator.bayes.factors import KroneckerFactors, load_factors
from annotator.bayes.interface import WeightDraws
from annotator.bayes.moments import cosine_moments
from annotator.bayes.posterior import DEFAULT_CHUNK_SIZE, ELEMENT_BUDGET, ProjectionPosterior
from annotator.bayes.predictive import bald_from_logits, sample_logits
from annotator.bayes.zeroshot import ZeroShotPosterior
from annotator.bench.tables import markdown_table
from annotator.errors import InputError

logger = logging.getLogger(__name__)

#: Prior precision of the image projection in the published ViT-B-32 laion2b_s34b_b79k
#: factors (``lambda_img`` of their ``prior_precision_analytic.json``), used for the
#: synthetic factors.
PUBLISHED_PRIOR_PRECISION = 1708.9
#: Eigenvalue ranges of the published ViT-B-32 image factors, after symmetrisation:
#: ``A`` from about 41 to 7.0e4 and ``B`` from about −5e-4 to 437.
SYNTHETIC_A_RANGE = (41.0, 7.0e4)
SYNTHETIC_B_RANGE = (1e-3, 437.0)
#: CLIP's logit scale, ``exp(log 100)`` after training.
LOGIT_SCALE = 100.0
#: Seconds between two readings of the resident memory during a CPU stage.
POLL_INTERVAL_S = 0.002


@dataclasses.dataclass(frozen=True)
class Measurement:
    """Wall time in seconds and peak extra memory in bytes of one stage."""

    seconds: float
    peak_bytes: int


def realistic_projection(
    feature_dim: int,
    embed_dim: int,
    *,
    generator: torch.Generator,
    factors_directory: str | Path | None = None,
    side: str = "image",
) -> tuple[ProjectionPosterior, Tensor]:
    """Build a projection posterior whose scales resemble the published ViT-B-32 factors.

    The factors are the published ones when ``factors_directory`` contains factors of shape
    ``(feature_dim, embed_dim)`` for ``side``. Otherwise they are random symmetric positive
    definite matrices with eigenvalues spaced log-uniformly over the published ranges
    (:data:`SYNTHETIC_A_RANGE`, :data:`SYNTHETIC_B_RANGE`), ``n = 1`` and
    ``λ =`` :data:`PUBLISHED_PRIOR_PRECISION`.

    No pretrained weight can be loaded here, so ``W*`` is random with i.i.d. Gaussian entries,
    scaled to the Frobenius norm at which ``λ`` maximises the Laplace evidence:
    ``‖W*‖² = P/λ − (D tr A'⁻¹ + p tr B'⁻¹) / (2√λ)`` with ``P = p·D``.

    Returns
    -------
    posterior : ProjectionPosterior
    input_factor : Tensor, shape (p, p)
        The undamped ``A``; features drawn from ``N(0, A)`` have its second moments.
    """
    factors = None
    if factors_directory is not None and Path(factors_directory).is_dir():
        loaded = load_factors(factors_directory)
        candidate = loaded.image if side == "image" else loaded.text
        if candidate is not None and (candidate.input_dim, candidate.output_dim) == (
            feature_dim,
            embed_dim,
        ):
            factors = candidate
    if factors is None:
        factors = KroneckerFactors(
            A=_random_spd(feature_dim, SYNTHETIC_A_RANGE, generator),
            B=_random_spd(embed_dim, SYNTHETIC_B_RANGE, generator),
            n=1.0,
            prior_precision=PUBLISHED_PRIOR_PRECISION,
        )

    A_damped, B_damped = factors.damped()
    precision = factors.prior_precision
    num_parameters = feature_dim * embed_dim
    trace_terms = (
        embed_dim * torch.linalg.inv(A_damped).trace()
        + feature_dim * torch.linalg.inv(B_damped).trace()
    )
    norm_sq = num_parameters / precision - float(trace_terms) / (2.0 * math.sqrt(precision))
    if norm_sq <= 0:
        raise InputError(
            f"the evidence condition gives ‖W*‖² = {norm_sq:.3g} <= 0 for these factors. "
            "Use factors with a smaller prior precision"
        )
    weight = torch.randn(embed_dim, feature_dim, generator=generator, dtype=torch.float64)
    weight = weight * math.sqrt(norm_sq) / weight.norm()
    return ProjectionPosterior(weight, factors), factors.A.to(torch.float64)


def run_scoring_benchmark(
    pool_sizes: Sequence[int] = (10_000, 100_000, 1_000_000),
    class_counts: Sequence[int] = (10, 1000),
    feature_dim: int = 768,
    embed_dim: int = 512,
    *,
    num_samples: int = 100,
    method_samples: int | None = None,
    mc_subset: int = 2_000,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    device: str | torch.device | None = None,
    seed: int = 0,
    factors_directory: str | Path | None = None,
) -> pd.DataFrame:
    """Time the method's BALD against its floor and weight-space Monte Carlo.

    Parameters
    ----------
    pool_sizes : sequence of int
        Pool sizes ``N``.
    class_counts : sequence of int
        Class counts ``C``.
    feature_dim, embed_dim : int
        ``p`` and ``D`` of the image projection (ViT-B-32: 768 and 512).
    num_samples : int
        Weight draws of Monte Carlo.
    method_samples : int, optional
        Logit samples per image and class of the method; ``num_samples`` when None.
    mc_subset : int
        Monte Carlo scores at most this many images of each pool, the first ones.
    chunk_size : int
        Pool rows per chunk, for the method and the floor.
    device : str or torch.device, optional
        ``"cuda"`` when available and None, else the CPU.
    seed : int
        Seed of the generators.
    factors_directory : str or Path, optional
        Published factors to use when their shapes match.

    Returns
    -------
    pandas.DataFrame
        One row per case with seconds, microseconds per image, peak MiB of each stage, the
        ratios to the targets and the Spearman correlation.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    generator = torch.Generator().manual_seed(seed)
    image, input_factor = realistic_projection(
        feature_dim, embed_dim, generator=generator, factors_directory=factors_directory
    )
    image = ProjectionPosterior(image.weight.to(device), image.factors)
    feature_colouring = torch.linalg.cholesky(
        input_factor + 1e-6 * input_factor.diagonal().mean() * torch.eye(feature_dim).double()
    ).T.to(device=device, dtype=torch.float32)

    rows = []
    for num_pool in pool_sizes:
        features = _draw_features(num_pool, feature_colouring, seed=seed + num_pool, device=device)
        for num_classes in class_counts:
            classes = _class_embeddings(image, num_classes, generator).to(device)
            posterior = ZeroShotPosterior(image, class_embeddings=classes, logit_scale=LOGIT_SCALE)
            rows.append(
                _run_case(
                    posterior,
                    features,
                    num_samples=num_samples,
                    method_samples=method_samples or num_samples,
                    mc_subset=mc_subset,
                    chunk_size=chunk_size,
                    seed=seed,
                )
            )
            logger.info("Scoring case done: %s", rows[-1])
        del features
    table = pd.DataFrame(rows)
    table.attrs["device"] = _describe_device(device)
    table.attrs["threads"] = torch.get_num_threads()
    table.attrs["num_samples"] = num_samples
    table.attrs["method_samples"] = method_samples or num_samples
    table.attrs["chunk_size"] = chunk_size
    table.attrs["factors"] = "published" if factors_directory else "synthetic"
    return table


def measure_cosine_approximation(
    *,
    embed_dim: int = 512,
    feature_dim: int = 768,
    text_dim: int = 512,
    num_images: int = 200,
    num_classes: int = 10,
    num_draws: int = 2_000,
    factors_directory: str | Path | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """Compare the closed-form cosine moments with Monte Carlo over the full posterior.

    Monte Carlo draws whole projection matrices from the matrix-normal posteriors, with the
    full row covariance ``B'⁻¹`` and not only its diagonal, and computes the exact cosine of
    each image with each class. Image features are drawn from ``N(0, A_img)`` and class
    features from ``N(0, A_txt)``; both projections come from :func:`realistic_projection`.

    Returns
    -------
    pandas.DataFrame
        One row for a fixed text side and one for a random text side. The columns give the
        mean and 90th percentile of ``|E_approx − E_mc|`` in units of the Monte Carlo
        standard deviation, and the median and 90th percentile of
        ``|σ_approx / σ_mc − 1|``. They also give the mean Monte Carlo standard deviation
        of the cosine and the Spearman correlation of the per-pair standard deviations.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    generator = torch.Generator().manual_seed(seed)
    image, image_input = realistic_projection(
        feature_dim, embed_dim, generator=generator, factors_directory=factors_directory
    )
    text, text_input = realistic_projection(
        text_dim, embed_dim, generator=generator, factors_directory=factors_directory, side="text"
    )
    image_features = _draw_features(
        num_images, torch.linalg.cholesky(image_input).T.float(), seed=seed + 1, device="cpu"
    ).double()
    class_features = _draw_features(
        num_classes, torch.linalg.cholesky(text_input).T.float(), seed=seed + 2, device="cpu"
    ).double()

    rows = []
    for random_text in (False, True):
        mean_g, variance_g = image.embedding_moments(image_features)
        mean_h, variance_h = text.embedding_moments(class_features)
        approx_mean, approx_variance = cosine_moments(
            mean_g, variance_g, mean_h, variance_h if random_text else None
        )

        # Monte Carlo over the full matrix-normal posteriors, accumulated draw by draw.
        draw_generator = torch.Generator().manual_seed(seed + 3)
        total = torch.zeros_like(approx_mean)
        total_sq = torch.zeros_like(approx_mean)
        group = max(1, ELEMENT_BUDGET // (embed_dim * max(feature_dim, text_dim)))
        for start in range(0, num_draws, group):
            count = min(group, num_draws - start)
            # W_s φ for each image, the same as projecting with sampled matrices W_s.
            embeddings = image.sample_projected(image_features, count, draw_generator).to(device)
            if random_text:
                classes = text.sample_projected(class_features, count, draw_generator).to(device)
            else:
                classes = mean_h.to(device).expand(count, -1, -1)
            cosines = torch.matmul(
                torch.nn.functional.normalize(embeddings, dim=-1),
                torch.nn.functional.normalize(classes, dim=-1).transpose(1, 2),
            ).cpu()
            total += cosines.sum(0)
            total_sq += (cosines**2).sum(0)
        mc_mean = total / num_draws
        mc_std = (total_sq / num_draws - mc_mean**2).clamp_min(0.0).sqrt()
        approx_std = approx_variance.sqrt()

        mean_error = ((approx_mean - mc_mean).abs() / mc_std).flatten()
        std_error = (approx_std / mc_std - 1.0).abs().flatten()
        rows.append(
            {
                "text_side": "random" if random_text else "fixed",
                "embed_dim": embed_dim,
                "pairs": num_images * num_classes,
                "draws": num_draws,
                # Relative standard error of a standard deviation estimated from the draws.
                "mc_std_rel_se": 1.0 / math.sqrt(2.0 * num_draws),
                "mc_std_cos_mean": float(mc_std.mean()),
                "mean_error_in_std_mean": float(mean_error.mean()),
                "mean_error_in_std_p90": float(mean_error.quantile(0.9)),
                "std_rel_error_median": float(std_error.median()),
                "std_rel_error_p90": float(std_error.quantile(0.9)),
                "std_spearman": float(
                    stats.spearmanr(approx_std.flatten().numpy(), mc_std.flatten().numpy())[0]
                ),
            }
        )
    table = pd.DataFrame(rows)
    table.attrs["factors"] = (
        "published"
        if factors_directory is not None and Path(factors_directory).is_dir()
        else "synthetic"
    )
    return table


def _run_case(
    posterior: ZeroShotPosterior,
    features: Tensor,
    *,
    num_samples: int,
    method_samples: int,
    mc_subset: int,
    chunk_size: int,
    seed: int,
) -> dict[str, object]:
    num_pool = features.shape[0]
    num_classes = posterior.num_classes
    device = features.device

    def new_generator(offset: int) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(seed + offset)

    # Warm up kernels and the posterior's per-device caches on a small slice.
    score_pool(posterior, features[:64], "bald", num_samples=4, generator=new_generator(0))

    method_scores, method = _measure(
        device,
        lambda: score_pool(
            posterior,
            features,
            "bald",
            num_samples=method_samples,
            generator=new_generator(1),
            chunk_size=chunk_size,
        ),
    )
    _, floor = _measure(device, lambda: _floor(posterior, features, chunk_size))
    _, sampling = _measure(
        device,
        lambda: _sampling_only(num_pool, num_classes, method_samples, device, new_generator(2)),
    )

    # Monte Carlo: the weight draws are a one-off cost, timed apart from the per-image work.
    subset = min(mc_subset, num_pool)
    draws, drawing = _measure(
        device, lambda: posterior.sample_weights(num_samples, new_generator(3), dtype=torch.float32)
    )
    mc_scores, monte_carlo = _measure(
        device, lambda: _weight_monte_carlo_bald(posterior, features[:subset], draws, chunk_size)
    )
    spearman = float(
        stats.spearmanr(method_scores[:subset].cpu().numpy(), mc_scores.cpu().numpy())[0]
    )
    # Two Monte Carlo runs with independent draws bound the rank agreement any estimate can
    # reach against one noisy Monte Carlo ranking.
    repeat_draws = posterior.sample_weights(num_samples, new_generator(4), dtype=torch.float32)
    repeat_scores = _weight_monte_carlo_bald(posterior, features[:subset], repeat_draws, chunk_size)
    spearman_repeat = float(
        stats.spearmanr(repeat_scores.cpu().numpy(), mc_scores.cpu().numpy())[0]
    )

    method_per_image = method.seconds / num_pool
    floor_per_image = floor.seconds / num_pool
    sampling_per_image = sampling.seconds / num_pool
    mc_per_image = monte_carlo.seconds / subset
    return {
        "pool": num_pool,
        "classes": num_classes,
        "method_samples": method_samples,
        "mc_draws": num_samples,
        "method_s": method.seconds,
        "floor_s": floor.seconds,
        "sampling_s": sampling.seconds,
        "mc_subset": subset,
        "mc_s": monte_carlo.seconds,
        "mc_draws_s": drawing.seconds,
        "method_us_per_image": 1e6 * method_per_image,
        "floor_us_per_image": 1e6 * floor_per_image,
        "sampling_us_per_image": 1e6 * sampling_per_image,
        "mc_us_per_image": 1e6 * mc_per_image,
        "method_over_floor_plus_sampling": method_per_image
        / (floor_per_image + sampling_per_image),
        "mc_over_method": mc_per_image / method_per_image,
        "method_peak_mib": method.peak_bytes / 2**20,
        "floor_peak_mib": floor.peak_bytes / 2**20,
        "mc_peak_mib": monte_carlo.peak_bytes / 2**20,
        "spearman_bald": spearman,
        "spearman_mc_repeat": spearman_repeat,
    }


def _floor(posterior: ZeroShotPosterior, features: Tensor, chunk_size: int) -> None:
    """Compute ``Φ C_A⁻ᵀ`` chunk by chunk, the product that no scoring of the pool avoids."""
    whitener_t, _ = posterior.image._matrices(features)
    for chunk in features.split(chunk_size):
        _ = chunk.to(whitener_t.dtype) @ whitener_t


def _weight_monte_carlo_bald(
    posterior: ZeroShotPosterior, features: Tensor, draws: WeightDraws, chunk_size: int
) -> Tensor:
    """Compute BALD from whole weight draws, in the row groups that ``score_pool`` uses."""
    group = max(1, ELEMENT_BUDGET // (draws.num_samples * posterior.num_classes))
    parts = []
    for chunk in features.split(chunk_size):
        for rows in chunk.split(group):
            parts.append(bald_from_logits(posterior.sampled_logits(rows, draws)))
    return torch.cat(parts)


def _sampling_only(
    num_pool: int,
    num_classes: int,
    num_samples: int,
    device: torch.device,
    generator: torch.Generator,
) -> None:
    """Draw the logits BALD needs from fixed moments and compute BALD, in the same groups."""
    if num_classes > DEFAULT_SAMPLED_CLASSES + 1:
        num_classes = DEFAULT_SAMPLED_CLASSES + 1
    group = max(1, ELEMENT_BUDGET // (num_samples * num_classes))
    mean = torch.zeros(group, num_classes, device=device)
    variance = torch.ones(group, num_classes, device=device)
    for start in range(0, num_pool, group):
        rows = min(group, num_pool - start)
        bald_from_logits(sample_logits(mean[:rows], variance[:rows], num_samples, generator))


def _measure(
    device: torch.device, run: Callable[[], Tensor | None]
) -> tuple[Tensor | None, Measurement]:
    with _peak_memory(device) as peak:
        start = time.perf_counter()
        result = run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    return result, Measurement(seconds=seconds, peak_bytes=peak())


@contextlib.contextmanager
def _peak_memory(device: torch.device) -> Iterator[Callable[[], int]]:
    """Yield a function that returns the peak growth of memory in bytes inside the block."""
    result = {"bytes": -1}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
        yield lambda: result["bytes"]
        torch.cuda.synchronize(device)
        result["bytes"] = torch.cuda.max_memory_allocated(device) - baseline
        return

    _release_free_heap()
    try:
        baseline = _status_kib("RssAnon")
    except OSError as error:
        # NOTE: without /proc/self/status (not Linux) CPU peak memory is reported as -1.
        logger.warning("Cannot read the resident memory of this process: %s", error)
        yield lambda: result["bytes"]
        return
    # Anonymous memory excludes library code pages, which the kernel evicts and faults back
    # in under memory pressure from other processes.
    peak = {"kib": baseline}
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            peak["kib"] = max(peak["kib"], _status_kib("RssAnon"))
            stop.wait(POLL_INTERVAL_S)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        yield lambda: result["bytes"]
    finally:
        stop.set()
        poller.join()
        peak["kib"] = max(peak["kib"], _status_kib("RssAnon"))
        result["bytes"] = 1024 * (peak["kib"] - baseline)


def _release_free_heap() -> None:
    """Return freed heap memory to the system, so that each stage starts from the same floor.

    glibc keeps memory that earlier stages freed. A stage that reuses it then shows no growth,
    and one that runs after it was returned shows all of it, so without the trim the reading of
    a stage depends on the stages before it.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        # NOTE: without glibc (musl, macOS) CPU peaks can include memory freed by earlier stages.
        pass


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field} line")


def _draw_features(
    num_rows: int, colouring: Tensor, *, seed: int, device: str | torch.device
) -> Tensor:
    """Draw ``num_rows`` float32 features from ``N(0, LᵀL)``, chunk by chunk, on ``device``."""
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    colouring = colouring.to(device)
    features = torch.empty(num_rows, colouring.shape[0], dtype=torch.float32, device=device)
    for start in range(0, num_rows, DEFAULT_CHUNK_SIZE):
        rows = min(DEFAULT_CHUNK_SIZE, num_rows - start)
        noise = torch.randn(
            rows, colouring.shape[0], generator=generator, dtype=torch.float32, device=device
        )
        features[start : start + rows] = noise @ colouring
    return features


def _class_embeddings(
    image: ProjectionPosterior, num_classes: int, generator: torch.Generator
) -> Tensor:
    """Draw random unit class embeddings (C, D) in float64, since cosines ignore the norm."""
    classes = torch.randn(num_classes, image.output_dim, generator=generator, dtype=torch.float64)
    return torch.nn.functional.normalize(classes, dim=-1)


def _random_spd(
    size: int, eigenvalue_range: tuple[float, float], generator: torch.Generator
) -> Tensor:
    low, high = eigenvalue_range
    eigenvalues = torch.logspace(math.log10(low), math.log10(high), size, dtype=torch.float64)
    basis, _ = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
    return (basis * eigenvalues) @ basis.T


def _describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def format_markdown(table: pd.DataFrame) -> str:
    """Render a result table as Markdown, floats with three significant digits."""
    return markdown_table(table, _format_result_cell)


def _format_result_cell(_: str, value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float | np.floating) else str(value)
