"""A demo project built once per session, and unlabelled copies of it for each test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from annotator.services.demo import DemoBuild
from annotator.services.project import Project
from annotator.services.simulate import scratch_copy


@pytest.fixture
def project(demo_build: DemoBuild, tmp_path: Path) -> Iterator[Project]:
    """An unlabelled copy of the demo project that shares its feature cache, with round 0."""
    from annotator.services.oracle import label_evaluation_from_oracle
    from annotator.services.rounds import run_round

    copy = scratch_copy(demo_build.project, tmp_path / "copy", strategy="bald", seed=0)
    label_evaluation_from_oracle(copy)
    run_round(copy, note="zero-shot")
    yield copy
    copy.close()
