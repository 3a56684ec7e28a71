"""The ``annotator`` command line, run in-process with Typer's runner on real projects."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import open_clip
import pandas as pd
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from annotator.cli.main import app
from annotator.services.demo import DemoBuild

ARCH = "ViT-S-32-alt"
"""The smallest ViT CLIP that open_clip ships a config for; used with random weights."""

runner = CliRunner()


def _invoke(*args: str):
    return runner.invoke(app, ["--log-level", "WARNING", *args], catch_exceptions=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised ViT-S-32-alt saved as a local checkpoint file."""
    torch.manual_seed(0)
    model = open_clip.create_model(ARCH, pretrained=None)
    path = tmp_path_factory.mktemp("checkpoint") / "vit-s-32-alt-random.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    generator = torch.Generator().manual_seed(0)
    for index in range(24):
        pixels = (torch.rand(40, 48, 3, generator=generator) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"photo-{index:02d}.png")
    (folder / "empty.png").write_bytes(b"")
    (folder / "readme.png").write_text("not a picture\n")
    return folder


def test_project_lifecycle(tmp_path: Path, image_folder: Path, checkpoint: Path) -> None:
    project = tmp_path / "project"

    created = _invoke(
        "init", str(project), "--images", str(image_folder),
        "--class", "cat", "--class", "dog", "--class", "fox",
        "--model", str(checkpoint), "--arch", ARCH,
        "--factors", "estimate", "--evaluation-size", "6", "--batch-size", "5",
    )  # fmt: skip
    assert created.exit_code == 0, created.output
    assert "next: annotator ingest" in created.output

    ingested = _invoke("ingest", str(project), "--no-progress")
    assert ingested.exit_code == 0, ingested.output
    assert "26 files found, 26 new, 24 usable, 2 skipped, 24 encoded" in ingested.output
    assert "empty.png: empty file (0 bytes)" in ingested.output
    assert "readme.png: not an image" in ingested.output
    assert (project / "cache" / "model").is_dir()

    status = _invoke("status", str(project))
    assert status.exit_code == 0, status.output
    assert "pool / evaluation split      18 / 6" in status.output
    assert "estimated from the pool, saved in" in status.output

    ranked = _invoke("rank", str(project), "--top", "5")
    assert ranked.exit_code == 0, ranked.output
    assert len(ranked.output.strip().splitlines()) == 6

    evaluated = _invoke("evaluate", str(project))
    assert evaluated.exit_code == 0, evaluated.output
    assert "no labelled evaluation images yet" in evaluated.output

    reranked = _invoke("rank", str(project), "--top", "3", "--strategy", "margin")
    assert reranked.exit_code == 0, reranked.output

    exported = _invoke("export", str(project), "--out", str(tmp_path / "labels.csv"))
    assert exported.exit_code == 0, exported.output
    assert "wrote 0 labelled images" in exported.output

    factors = tmp_path / "factors"
    estimated = _invoke(
        "hessian", "estimate", "--project", str(project), "--out", str(factors), "--no-progress"
    )
    assert estimated.exit_code == 0, estimated.output
    assert (factors / "A_img_analytic.pt").is_file()
    assert (factors / "prior_precision_analytic.json").is_file()


def test_init_twice_rejected(tmp_path: Path, image_folder: Path) -> None:
    project = tmp_path / "project"
    args = ["init", str(project), "--images", str(image_folder), "--class", "a", "--class", "b"]
    assert _invoke(*args).exit_code == 0

    again = _invoke(*args)

    assert again.exit_code == 2
    assert "already contains a project" in again.output


def test_init_without_classes(tmp_path: Path, image_folder: Path) -> None:
    result = _invoke("init", str(tmp_path / "p"), "--images", str(image_folder))

    assert result.exit_code == 2
    assert "no classes given" in result.output


@pytest.mark.parametrize(
    ("classes", "expected"),
    [
        (["a"], "at least two classes are required, got 1"),
        (["cat", "Cat"], "class names must be unique, ignoring case; repeated: Cat, cat"),
        (["", "b"], "String should have at least 1 character"),
    ],
)
def test_init_invalid_classes(
    tmp_path: Path, image_folder: Path, classes: list[str], expected: str
) -> None:
    args = ["init", str(tmp_path / "p"), "--images", str(image_folder)]
    for name in classes:
        args += ["--class", name]

    result = _invoke(*args)

    assert result.exit_code == 2
    assert "invalid options of annotator init" in result.output
    assert expected in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "p").exists()


def test_init_missing_images(tmp_path: Path) -> None:
    result = _invoke(
        "init", str(tmp_path / "p"), "--images", str(tmp_path / "nowhere"),
        "--class", "a", "--class", "b",
    )  # fmt: skip

    assert result.exit_code == 2
    assert f"image folder {tmp_path / 'nowhere'} not found" in result.output
    assert not (tmp_path / "p").exists()


def test_unknown_strategy(tmp_path: Path, image_folder: Path) -> None:
    result = _invoke(
        "init", str(tmp_path / "p"), "--images", str(image_folder),
        "--class", "a", "--class", "b", "--strategy", "best",
    )  # fmt: skip

    assert result.exit_code == 2
    assert "unknown strategy 'best'" in result.output


def test_missing_project(tmp_path: Path) -> None:
    result = _invoke("ingest", str(tmp_path / "nowhere"))

    assert result.exit_code == 2
    assert "project config" in result.output
    assert "not found" in result.output


def test_simulate_needs_one_source() -> None:
    result = _invoke("simulate", "--rounds", "1")

    assert result.exit_code == 2
    assert "either a project folder or --dataset" in result.output


def test_models_check(checkpoint: Path) -> None:
    result = _invoke("models", "check", str(checkpoint), "--arch", ARCH)

    assert result.exit_code == 0, result.output


def test_models_check_offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    started = time.monotonic()

    result = _invoke("models", "check", "hf-hub:nobody/no-such-model")

    assert result.exit_code == 1
    assert time.monotonic() - started < 5
    assert "hf-hub:nobody/no-such-model" in result.output


def test_simulate_demo(demo_build: DemoBuild, tmp_path: Path) -> None:
    out = tmp_path / "sim.csv"

    result = _invoke(
        "simulate", str(demo_build.project.directory), "--rounds", "2", "--batch", "10",
        "--strategy", "bald", "--strategy", "random", "--seed", "0", "--out", str(out),
        "--no-progress",
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    frame = pd.read_csv(out)
    assert len(frame) == 2 * 3
    assert set(frame["strategy"]) == {"bald", "random"}
    assert frame.groupby("strategy")["labels_spent"].apply(list).tolist() == [[0, 10, 20]] * 2
    assert frame["accuracy"].notna().all()
    assert out.with_suffix(".png").read_bytes().startswith(b"\x89PNG")
    assert "<html" in out.with_suffix(".html").read_text().lower()


@pytest.mark.skipif(os.name != "posix", reason="signals are POSIX")
def test_serve_stops_on_sigterm(demo_build: DemoBuild, tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    command = [
        sys.executable, "-m", "annotator.cli.main", "serve", str(demo_build.project.directory),
        "--port", str(port),
    ]  # fmt: skip
    with (tmp_path / "serve.log").open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}/_stcore/health"
            deadline = time.monotonic() + 120
            healthy = False
            while not healthy and time.monotonic() < deadline and process.poll() is None:
                try:
                    with urllib.request.urlopen(url, timeout=2) as response:
                        healthy = response.read().decode().strip() == "ok"
                except OSError:
                    time.sleep(0.5)
            assert healthy, (tmp_path / "serve.log").read_text()

            process.send_signal(signal.SIGTERM)
            process.wait(timeout=20)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()

    # The server is gone with the process: nothing accepts connections on the port any more.
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0
