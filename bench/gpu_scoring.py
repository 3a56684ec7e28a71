"""Scoring benchmark on a CUDA GPU: the same stages as ``annotator bench scoring``.

Run from the repository root on a machine with a GPU::

    python bench/gpu_scoring.py --output scoring.json

It runs the BALD scoring benchmark for pools of 10,000 to 1,000,000 images and 10 and 1,000
classes, then the cosine approximation against Monte Carlo at D = 512, and prints Markdown
tables for docs/benchmarks.md. Cases run from the smallest pool up. A case is skipped, with a
note, when the time of the previous case scaled by the pool size would pass ``--time-limit``
seconds, so the script stays under 5 minutes.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from annotator.bench.scoring import (
    format_markdown,
    measure_cosine_approximation,
    run_scoring_benchmark,
)


def _integers(text: str) -> list[int]:
    return [int(part.replace("_", "")) for part in text.split(",") if part]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--pool-sizes",
        type=_integers,
        default=[10_000, 100_000, 1_000_000],
        help="comma-separated pool sizes N",
    )
    parser.add_argument(
        "--class-counts", type=_integers, default=[10, 1000], help="comma-separated class counts C"
    )
    parser.add_argument("--num-samples", type=int, default=100, help="weight draws of Monte Carlo")
    parser.add_argument(
        "--method-samples",
        type=int,
        default=None,
        help="logit samples per image of the method; --num-samples when omitted",
    )
    parser.add_argument(
        "--mc-subset", type=int, default=20_000, help="images scored by weight-space Monte Carlo"
    )
    parser.add_argument("--cosine-draws", type=int, default=5_000, help="Monte Carlo draws")
    parser.add_argument(
        "--device", default="cuda", help="torch device; 'cpu' only for a quick smoke run"
    )
    parser.add_argument(
        "--time-limit", type=float, default=240.0, help="seconds after which cases are skipped"
    )
    parser.add_argument("--factors", type=Path, default=None, help="published factor folder")
    parser.add_argument("--output", type=Path, default=None, help="also write JSON here")
    arguments = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    device = torch.device(arguments.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available. Run this script on a machine with a GPU", file=sys.stderr)
        return 1

    started = time.perf_counter()
    tables = []
    skipped = []
    previous: tuple[int, float] | None = None
    for pool_size in sorted(arguments.pool_sizes):
        elapsed = time.perf_counter() - started
        if previous is not None:
            estimate = previous[1] * pool_size / previous[0]
            if elapsed + estimate > arguments.time_limit:
                skipped.append(pool_size)
                print(
                    f"Skipping N={pool_size}: about {estimate:.0f} s more would pass the "
                    f"{arguments.time_limit:.0f} s limit",
                    file=sys.stderr,
                )
                continue
        case_start = time.perf_counter()
        tables.append(
            run_scoring_benchmark(
                pool_sizes=(pool_size,),
                class_counts=tuple(arguments.class_counts),
                num_samples=arguments.num_samples,
                method_samples=arguments.method_samples,
                mc_subset=arguments.mc_subset,
                device=device,
                factors_directory=arguments.factors,
            )
        )
        previous = (pool_size, time.perf_counter() - case_start)

    scoring = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    cosine = measure_cosine_approximation(
        num_draws=arguments.cosine_draws, device=device, factors_directory=arguments.factors
    )
    total = time.perf_counter() - started

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"\n## Scoring on {device_name} ({total:.0f} s in all)\n")
    method_samples = arguments.method_samples or arguments.num_samples
    print(
        f"Method: {method_samples} logit samples per image. Monte Carlo: "
        f"{arguments.num_samples} weight draws on the first {arguments.mc_subset} images"
    )
    if skipped:
        print(f"Skipped pool sizes (time limit): {skipped}")
    print()
    print(format_markdown(scoring))
    print(f"\n## Cosine approximation ({arguments.cosine_draws} draws)\n")
    print(format_markdown(cosine))

    if arguments.output is not None:
        arguments.output.write_text(
            json.dumps(
                {
                    "device": device_name,
                    "seconds": total,
                    "skipped_pool_sizes": skipped,
                    "scoring": scoring.to_dict(orient="records"),
                    "cosine": cosine.to_dict(orient="records"),
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
