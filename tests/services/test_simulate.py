"""Strategy simulation through the services, with and without a held-out class."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from annotator.errors import InputError
from annotator.services.demo import DemoBuild
from annotator.services.oracle import read_oracle
from annotator.services.project import open_project
from annotator.services.simulate import SIMULATION_COLUMNS, simulate_project


def test_simulation_rows(demo_build: DemoBuild, tmp_path: Path) -> None:
    frame = simulate_project(
        demo_build.project,
        strategies=["random", "margin"],
        seeds=[0, 1],
        rounds=2,
        batch_size=10,
        work_dir=tmp_path,
        progress=False,
    )

    assert list(frame.columns) == SIMULATION_COLUMNS
    assert len(frame) == 2 * 2 * 3
    assert (
        frame.groupby(["strategy", "seed"])["labels_spent"].apply(list).tolist()
        == [[0, 10, 20]] * 4
    )
    assert frame["accuracy"].between(0, 1).all()
    assert frame["ood_auroc"].isna().all()
    zero_shot = frame[frame["round"] == 0]["accuracy"]
    assert zero_shot.nunique() == 1


def test_held_out_class_never_labelled(demo_build: DemoBuild, tmp_path: Path) -> None:
    frame = simulate_project(
        demo_build.project,
        strategies=["bald"],
        seeds=[0],
        rounds=2,
        batch_size=10,
        work_dir=tmp_path,
        progress=False,
        held_out_class="nine",
    )

    assert frame["ood_auroc"].between(0, 1).all()
    copy = open_project(tmp_path / "bald-seed0")
    assert "nine" not in copy.config.class_names
    oracle = read_oracle(copy, allow_unknown=True)
    labels = copy.store.labels_frame(copy.project_id)
    labelled = {str(Path(p).resolve()) for p in labels["path"]}
    nines = {path for path, label in oracle.items() if label == "nine"}
    assert nines
    assert labelled.isdisjoint(nines)
    images = copy.store.images_frame(copy.project_id, status="ok")
    resolved = images["path"].map(lambda p: str(Path(p).resolve()))
    assert set(images.loc[resolved.isin(nines), "split"]) == {"evaluation"}
    assert np.isfinite(frame["accuracy"]).all()
    copy.close()


def test_unknown_held_out_class(demo_build: DemoBuild) -> None:
    with pytest.raises(InputError, match="held-out class 'ten' is not a project class"):
        simulate_project(
            demo_build.project, strategies=["bald"], seeds=[0], rounds=1, batch_size=5,
            held_out_class="ten", progress=False,
        )  # fmt: skip
