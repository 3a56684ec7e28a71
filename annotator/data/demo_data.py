"""The demo dataset: scikit-learn's handwritten digits with a deployment shift.

scikit-learn ships the UCI handwritten digits (``sklearn.datasets.load_digits``): 1,797
greyscale images of 8×8 pixels with 17 grey levels (0–16) in 10 classes. For a seed, the
digits are split three ways without overlap:

- a training part, used only to train the demo model,
- a clean held-out part, to measure the demo model's zero-shot accuracy on clean digits,
- a deployment part, rendered into the pool that annotators label.

The pool shows each deployment digit several times, each time with another random deployment
shift: rotation, stroke width, blur, uneven lighting, lower contrast and sensor noise. The
demo model is trained on clean upright digits, so it is clearly less accurate on the pool
than on clean digits. The ground-truth labels go into a CSV file beside the pool folder, never into
it, so ranking code that reads only the pool cannot see them.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from annotator.errors import InputError
from annotator.files import write_atomic

logger = logging.getLogger(__name__)

DIGIT_NAMES: tuple[str, ...] = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
)
"""Class names of the digits, indexed by label."""

HELDOUT_FRACTION = 0.15
"""Fraction of the 1,797 digits in the clean held-out part."""
DEPLOYMENT_FRACTION = 0.35
"""Fraction of the 1,797 digits in the deployment part; the rest trains the demo model."""

DEFAULT_IMAGE_SIZE = 64
"""Side in pixels of the rendered digits, in the pool and during training."""
DEFAULT_VARIANTS_PER_DIGIT = 2
"""Shifted renderings of each deployment digit in the pool (629 digits give 1,258 images)."""

POOL_FOLDER = "pool"
_POOL_NAME_PATTERN = re.compile(r"digit-\d{5,}\.png")
GROUND_TRUTH_FILENAME = "ground_truth.csv"

_PAPER = 255
"""Grey level of the background. Digits are rendered as dark ink on white paper."""
_BORDER = 1
"""Background pixels added on each side of the 8×8 grid before upsampling, so that the
strokes keep a margin from the image edge."""


@dataclass(frozen=True)
class DigitSplits:
    """The three disjoint parts of scikit-learn's digits for one seed.

    Images are ``uint8`` arrays of shape ``(n, 8, 8)`` with the ink intensity scaled from the
    dataset's 0–16 to 0–255 (0 is background). Labels are ``int64`` arrays of shape ``(n,)``
    indexing ``DIGIT_NAMES``. The ``*_indices`` arrays give each image's row in
    ``load_digits()``, so a caller can check that the parts do not overlap.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    heldout_images: np.ndarray
    heldout_labels: np.ndarray
    deployment_images: np.ndarray
    deployment_labels: np.ndarray
    train_indices: np.ndarray
    heldout_indices: np.ndarray
    deployment_indices: np.ndarray


@dataclass(frozen=True)
class DemoPool:
    """A written demo pool.

    ``ground_truth_csv`` has the columns ``path,label``: ``path`` is a PNG file's path relative
    to the CSV's folder (``pool/digit-NNNNN.png``), as labelled-dataset readers expect, and
    ``label`` is its class name from ``DIGIT_NAMES``.
    """

    pool_dir: Path
    ground_truth_csv: Path
    num_images: int


def load_digit_splits(seed: int = 0) -> DigitSplits:
    """Split scikit-learn's digits into training, held-out and deployment parts.

    Both splits are stratified by class, so each part has about the same share of every digit.

    Parameters
    ----------
    seed
        Seed of the split. The same seed returns the same parts.

    Returns
    -------
    DigitSplits
        About 50% training, 15% held-out and 35% deployment digits (898, 270 and 629).
    """
    seed = _check_seed(seed)
    digits = load_digits()

    # The dataset stores ink intensity as 0..16 in float64; 16 * 255 / 16 is exactly 255.
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8)
    labels = digits.target.astype(np.int64)  # (1797,)
    indices = np.arange(len(labels))

    rest_indices, deployment_indices = train_test_split(
        indices, test_size=DEPLOYMENT_FRACTION, stratify=labels, random_state=seed
    )
    heldout_share_of_rest = HELDOUT_FRACTION / (1.0 - DEPLOYMENT_FRACTION)
    train_indices, heldout_indices = train_test_split(
        rest_indices,
        test_size=heldout_share_of_rest,
        stratify=labels[rest_indices],
        random_state=seed,
    )

    return DigitSplits(
        train_images=images[train_indices],
        train_labels=labels[train_indices],
        heldout_images=images[heldout_indices],
        heldout_labels=labels[heldout_indices],
        deployment_images=images[deployment_indices],
        deployment_labels=labels[deployment_indices],
        train_indices=train_indices,
        heldout_indices=heldout_indices,
        deployment_indices=deployment_indices,
    )


def render_digit(image_8x8: np.ndarray, size: int = DEFAULT_IMAGE_SIZE) -> Image.Image:
    """Render an 8×8 digit as dark ink on white paper, upsampled to ``size × size``.

    The digit gets a one-pixel background border and is upsampled bilinearly, so the strokes
    look smooth and keep a margin from the image edge. Training and the pool both render
    through this function, so the only difference between them is the deployment shift.

    Parameters
    ----------
    image_8x8
        ``uint8`` array of shape ``(8, 8)``: ink intensity, 0 is background and 255 full ink.
    size
        Side of the output image in pixels, at least 8.

    Returns
    -------
    PIL.Image.Image
        Greyscale (mode ``"L"``) image of ``size × size`` pixels, ``paper = 255 - ink``.
    """
    image_8x8 = np.asarray(image_8x8)
    if image_8x8.shape != (8, 8) or image_8x8.dtype != np.uint8:
        raise InputError(
            f"render_digit expects a uint8 array of shape (8, 8), got dtype {image_8x8.dtype} "
            f"and shape {image_8x8.shape}; pass one image from DigitSplits."
        )
    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        raise InputError(f"Invalid image size {size!r}: expected an integer of at least 8 pixels.")

    paper = _PAPER - image_8x8
    framed = np.pad(paper, _BORDER, mode="constant", constant_values=_PAPER)  # (10, 10)
    return Image.fromarray(framed, mode="L").resize((size, size), Image.Resampling.BILINEAR)


def shift_digit(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Apply a random deployment shift to a rendered digit.

    The shift imitates digits scanned from paper under poor conditions, in this order:

    1. stroke width: thicker (grey erosion of the paper) or thinner (grey dilation) ink,
       each with probability 0.4, unchanged otherwise,
    2. rotation by 10° to 30° in either direction, filling the corners with paper,
    3. Gaussian blur with a radius of 0.5 to 2.0 pixels (at 64 pixels; scaled with the size),
    4. lower contrast: ink at grey level 30–110 and paper at 160–235, with a linear
       lighting gradient of up to ±25 grey levels across the image,
    5. Gaussian sensor noise with a standard deviation of 4 to 16 grey levels.

    Parameters
    ----------
    image
        Greyscale image from :func:`render_digit`.
    rng
        Source of the shift's random parameters.

    Returns
    -------
    PIL.Image.Image
        Greyscale image of the same size.
    """
    if image.mode != "L":
        raise InputError(
            f"shift_digit expects a greyscale (mode 'L') image, got mode {image.mode!r}."
        )
    size = image.width
    scale = size / DEFAULT_IMAGE_SIZE

    # 1. Stroke width. Ink is dark, so a minimum filter thickens it and a maximum filter thins it.
    stroke = rng.choice(["thicker", "thinner", "same"], p=[0.4, 0.4, 0.2])
    kernel = max(3, 2 * round(1.5 * scale) + 1)
    if stroke == "thicker":
        image = image.filter(ImageFilter.MinFilter(kernel))
    elif stroke == "thinner":
        image = image.filter(ImageFilter.MaxFilter(kernel))

    # 2. Rotation about the centre.
    angle = rng.uniform(10.0, 30.0) * rng.choice([-1.0, 1.0])
    image = image.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=_PAPER)

    # 3. Blur.
    image = image.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.5, 2.0) * scale))

    # 4. Contrast and lighting: paper (1) maps to paper_level, ink (0) to ink_level.
    whiteness = np.asarray(image, dtype=np.float64) / 255.0  # (size, size)
    ink_level = rng.uniform(30.0, 110.0)
    paper_level = rng.uniform(160.0, 235.0)
    grey = ink_level + (paper_level - ink_level) * whiteness
    direction = rng.uniform(0.0, 2.0 * np.pi)
    coordinates = (np.arange(size) - (size - 1) / 2.0) / size  # in [-0.5, 0.5]
    ramp = np.cos(direction) * coordinates[None, :] + np.sin(direction) * coordinates[:, None]
    grey += 2.0 * rng.uniform(0.0, 25.0) * ramp

    # 5. Sensor noise.
    grey += rng.normal(0.0, rng.uniform(4.0, 16.0), size=grey.shape)

    return Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), mode="L")


def render_deployment_pool(
    splits: DigitSplits,
    *,
    seed: int = 0,
    variants_per_digit: int = DEFAULT_VARIANTS_PER_DIGIT,
    size: int = DEFAULT_IMAGE_SIZE,
) -> tuple[list[str], list[Image.Image], np.ndarray]:
    """Render the shifted pool images in memory, in the order of their file names.

    Variant ``v`` of deployment digit ``i`` draws its shift from a generator seeded with
    ``(seed, i, v)``, so an image does not depend on how many others are rendered. The file
    names number the images in a seeded random order, so neither a name nor its position reveals
    which digit or variant an image shows.

    Parameters
    ----------
    splits
        Splits from :func:`load_digit_splits`; only the deployment part is rendered.
    seed
        Seed of the shifts and of the file order.
    variants_per_digit
        Shifted renderings of each deployment digit, at least 1.
    size
        Side of the images in pixels.

    Returns
    -------
    names
        File names ``digit-00000.png``, ``digit-00001.png``, ….
    images
        Greyscale images, one per name.
    labels
        ``int64`` array of shape ``(len(names),)``: each image's label.
    """
    seed = _check_seed(seed)
    if isinstance(variants_per_digit, bool) or not isinstance(variants_per_digit, int):
        raise InputError(f"Invalid variants_per_digit {variants_per_digit!r}: expected an integer.")
    if variants_per_digit < 1:
        raise InputError(
            f"Invalid variants_per_digit {variants_per_digit}: expected at least 1 rendering "
            "of each deployment digit."
        )

    num_digits = len(splits.deployment_labels)
    num_images = num_digits * variants_per_digit
    order = np.random.default_rng([seed, num_images]).permutation(num_images)

    rendered: list[tuple[int, Image.Image, int]] = []
    for digit in range(num_digits):
        clean = render_digit(splits.deployment_images[digit], size)
        for variant in range(variants_per_digit):
            position = int(order[digit * variants_per_digit + variant])
            rng = np.random.default_rng([seed, digit, variant])
            rendered.append(
                (position, shift_digit(clean, rng), int(splits.deployment_labels[digit]))
            )
    rendered.sort(key=lambda item: item[0])

    names = [f"digit-{position:05d}.png" for position, _, _ in rendered]
    images = [image for _, image, _ in rendered]
    labels = np.array([label for _, _, label in rendered], dtype=np.int64)
    return names, images, labels


def write_demo_pool(
    out_dir: Path,
    *,
    seed: int = 0,
    variants_per_digit: int = DEFAULT_VARIANTS_PER_DIGIT,
) -> DemoPool:
    """Write the demo pool as PNG files and its ground truth as a CSV file beside it.

    Layout::

        out_dir/pool/digit-00000.png ...   greyscale PNGs of DEFAULT_IMAGE_SIZE pixels
        out_dir/ground_truth.csv           path,label (path relative to out_dir: pool/...)

    The output depends only on ``seed`` and ``variants_per_digit``: the same arguments write
    the same bytes. Writing again skips files whose bytes are already right and replaces the
    others atomically, so an interrupted build can be rerun.

    Parameters
    ----------
    out_dir
        Folder that receives ``pool/`` and ``ground_truth.csv``; created if missing.
    seed
        Seed of the split, the shifts and the file order.
    variants_per_digit
        Shifted renderings of each deployment digit.

    Returns
    -------
    DemoPool
        Where the pool and its ground truth are, and the number of images.

    Raises
    ------
    InputError
        If ``out_dir/pool`` contains a pool image (``digit-NNNNN.png``) that this build would
        not write, for example one from a build with more ``variants_per_digit``. Files with
        other names are left alone.
    """
    out_dir = Path(out_dir)
    pool_dir = out_dir / POOL_FOLDER
    ground_truth_csv = out_dir / GROUND_TRUTH_FILENAME

    splits = load_digit_splits(seed)
    names, images, labels = render_deployment_pool(
        splits, seed=seed, variants_per_digit=variants_per_digit
    )

    if pool_dir.is_dir():
        stale = sorted(
            name
            for name in set(os.listdir(pool_dir)) - set(names)
            if _POOL_NAME_PATTERN.fullmatch(name)
        )
        if stale:
            listed = ", ".join(stale[:5]) + (", ..." if len(stale) > 5 else "")
            raise InputError(
                f"The pool folder {pool_dir} contains {len(stale)} pool images that this build "
                f"would not write ({listed}), so its ground truth would miss them. Delete the "
                "folder or choose another out_dir."
            )

    logger.info(
        "Writing %d demo pool images to %s (seed %d, %d variants per digit)",
        len(names),
        pool_dir,
        seed,
        variants_per_digit,
    )
    pool_dir.mkdir(parents=True, exist_ok=True)
    written = 0
    for name, image in zip(names, images, strict=True):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        written += _write_if_changed(pool_dir / name, buffer.getvalue(), temporary_dir=out_dir)

    text = io.StringIO(newline="")
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["path", "label"])
    for name, label in zip(names, labels, strict=True):
        writer.writerow([f"{POOL_FOLDER}/{name}", DIGIT_NAMES[label]])
    _write_if_changed(ground_truth_csv, text.getvalue().encode("utf-8"), temporary_dir=out_dir)

    logger.info("Demo pool ready: %d images, %d written, rest unchanged", len(names), written)
    return DemoPool(pool_dir=pool_dir, ground_truth_csv=ground_truth_csv, num_images=len(names))


def _write_if_changed(path: Path, data: bytes, *, temporary_dir: Path) -> bool:
    """Write ``data`` to ``path`` through a temporary file and a rename, unless it is there.

    The temporary file goes to ``temporary_dir`` (on the same file system as ``path``), so a
    build killed mid-write leaves no partial file inside the pool folder.
    """
    if path.is_file() and path.read_bytes() == data:
        return False
    # No fsync: a pool lost to a power cut is rebuilt from the seed on the next run.
    write_atomic(path, lambda file: file.write(data), temporary_dir=temporary_dir, fsync=False)
    return True


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise InputError(f"Invalid seed {seed!r}: expected a non-negative integer.")
    return int(seed)
