"""Demo project copies for the app tests, and the app's entry script."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import annotator.app
from annotator.services.demo import DemoBuild
from annotator.services.oracle import label_evaluation_from_oracle
from annotator.services.project import Project
from annotator.services.rounds import run_round
from annotator.services.simulate import scratch_copy

APP_SCRIPT = Path(annotator.app.__file__).parent / "main.py"


@pytest.fixture
def app_project(
    demo_build: DemoBuild, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Project]:
    """An unlabelled copy of the demo with round 0, set as the app's project."""
    copy = scratch_copy(demo_build.project, tmp_path / "copy", strategy="power-bald", seed=0)
    label_evaluation_from_oracle(copy)
    run_round(copy, note="zero-shot")
    monkeypatch.setenv("ANNOTATOR_PROJECT", str(copy.directory))
    yield copy
    copy.close()
