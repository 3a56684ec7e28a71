"""Phrases that the CLI and the web app show for a project's stored state."""

from __future__ import annotations

import pytest

from annotator.services.summary import describe_factor_source


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("loaded:/data/hessians", "loaded from /data/hessians"),
        ("estimated:pool:/p/cache/factors", "estimated from the pool, saved in /p/cache/factors"),
        ("pending", "pending (set at the first ingest)"),
        ("estimated:pool", "estimated:pool"),
        ("demo", "demo"),
    ],
)
def test_describe_factor_source(source: str, expected: str) -> None:
    assert describe_factor_source(source) == expected
