"""Encoding throughput on a CUDA GPU: the same stages as ``annotator bench encode``.

Run from the repository root on a machine with a GPU::

    python bench/gpu_encode.py --arch ViT-B-32 --batch-size 256 --num-batches 16

It prints the table, the settings and a Markdown row for docs/benchmarks.md, and with
``--output FILE.json`` also writes them as JSON. With the defaults it generates 4,096 images.
A small first run measures the speed, and the full run is shortened when it would exceed
``--time-limit`` seconds, so the script stays under 5 minutes.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from annotator.bench.encode import run_encode_benchmark


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--arch", default="ViT-B-32", help="open_clip architecture (random weights)"
    )
    parser.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    parser.add_argument("--num-batches", type=int, default=16, help="batches per stage")
    parser.add_argument(
        "--num-workers", type=int, default=None, help="decoding workers; default: CPUs up to 16"
    )
    parser.add_argument(
        "--precision", default="auto", help="auto (bf16 or fp16), fp32, fp16 or bf16"
    )
    parser.add_argument(
        "--time-limit", type=float, default=270.0, help="seconds after which to stop scaling up"
    )
    parser.add_argument(
        "--output", type=Path, default=None, help="also write the results to this JSON file"
    )
    arguments = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if not torch.cuda.is_available():
        print("CUDA is not available; run this script on a machine with a GPU", file=sys.stderr)
        return 2

    started = time.perf_counter()
    # A small first run sizes the full one, so that the whole script stays within the limit.
    probe = run_encode_benchmark(
        arguments.arch,
        batch_size=arguments.batch_size,
        num_batches=2,
        num_workers=arguments.num_workers,
        device="cuda",
        precision=arguments.precision,
    )
    probe_seconds = time.perf_counter() - started
    print(
        f"probe run, 2 batches, {probe_seconds:.0f} s:\n{probe.to_string(index=False)}",
        file=sys.stderr,
    )
    scale = arguments.num_batches / 2
    if probe_seconds * (1 + scale) > arguments.time_limit:
        num_batches = max(2, int(2 * (arguments.time_limit - probe_seconds) / probe_seconds))
        print(
            f"reducing --num-batches to {num_batches} to stay within {arguments.time_limit:g} s",
            file=sys.stderr,
        )
    else:
        num_batches = arguments.num_batches
    frame = run_encode_benchmark(
        arguments.arch,
        batch_size=arguments.batch_size,
        num_batches=num_batches,
        num_workers=arguments.num_workers,
        device="cuda",
        precision=arguments.precision,
    )

    print(frame.to_string(index=False))
    print(json.dumps(frame.attrs, indent=2))
    forward, pipeline = frame["images_per_second"].iloc[1], frame["images_per_second"].iloc[2]
    print(
        f"| {frame.attrs['gpu']} | {arguments.arch} | {frame.attrs['dtype']} | {arguments.batch_size} | "
        f"{frame.attrs['num_workers']} | {forward:.0f} | {pipeline:.0f} | {pipeline / forward:.0%} |"
    )
    print(f"total {time.perf_counter() - started:.0f} s", file=sys.stderr)
    if arguments.output is not None:
        payload = {"rows": frame.to_dict(orient="records"), "settings": frame.attrs}
        arguments.output.write_text(json.dumps(payload, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
