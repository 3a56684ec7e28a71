"""Files around the package: shipped configs, the compose file, the Dockerfile, CI entry point.

No Docker engine runs here, so the compose file and the Dockerfile are checked by reading.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path

import pytest
import yaml

from annotator.config import load_config
from annotator.models.specs import ModelSpec
from annotator.services.demo import demo_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_config_valid(path: Path) -> None:
    config = load_config(path)

    assert len(config.classes) >= 2
    ModelSpec.parse(config.model.spec, arch=config.model.arch)


def test_demo_config_matches_code() -> None:
    assert load_config(ROOT / "configs" / "demo.yaml") == demo_config()


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_services(compose: dict) -> None:
    assert set(compose["services"]) == {"app", "db"}
    app = compose["services"]["app"]
    db = compose["services"]["db"]

    assert app["build"] == "."
    assert app["depends_on"] == {"db": {"condition": "service_healthy"}}
    assert re.fullmatch(r"postgres:\d+", db["image"])
    assert "healthcheck" in db
    assert set(compose["volumes"]) == {"pgdata", "cache"}
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            assert source.startswith("./") or source in compose["volumes"], volume


def test_compose_app_binds_loopback(compose: dict) -> None:
    ports = compose["services"]["app"]["ports"]

    assert ports == ["127.0.0.1:8501:8501"]


def test_compose_database_url_matches_server(compose: dict) -> None:
    app_env = compose["services"]["app"]["environment"]
    db_env = compose["services"]["db"]["environment"]
    url = app_env["ANNOTATOR_DATABASE_URL"]

    match = re.fullmatch(r"postgresql\+psycopg://(\w+):(\$\{[^}]+\})@db:5432/(\w+)", url)
    assert match is not None, url
    assert match.group(1) == db_env["POSTGRES_USER"]
    assert match.group(2) == db_env["POSTGRES_PASSWORD"]
    assert match.group(3) == db_env["POSTGRES_DB"]


def test_compose_command_uses_cli(compose: dict) -> None:
    command = " ".join(compose["services"]["app"]["command"])

    assert "annotator serve" in command
    assert "annotator demo" in command
    assert "--host 0.0.0.0 --port 8501" in command
    # Compose expands ${...} itself; $$ leaves the variable to the container's shell.
    assert "$${PROJECT}" in command
    assert "PROJECT" in compose["services"]["app"]["environment"]


def test_dockerfile_copies_existing_paths() -> None:
    text = (ROOT / "Dockerfile").read_text()
    copied = re.findall(r"^COPY (.+) \S+$", text, flags=re.MULTILINE)

    assert copied
    for sources in copied:
        for source in sources.split():
            assert (ROOT / source).exists(), source
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for pin in ("torch==2.14.1", "torchvision==0.29.1"):
        assert pin in pins
        assert pin in text
    assert "EXPOSE 8501" in text


def test_ci_entry_point() -> None:
    script = ROOT / ".ci" / "run"

    assert os.access(script, os.X_OK)
    text = script.read_text()
    assert "make test" in text
    assert "pg_ctlcluster --skip-systemctl-redirect" in text
