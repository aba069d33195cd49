"""docker-compose.yml and the Dockerfile: they parse, and what they name exists in the repo.

Docker itself does not run here; these checks catch the mistakes that would only show on
`docker compose up`: a renamed module, a missing file, a health check or dependency forgotten.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML is needed to parse docker-compose.yml")

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"


def _compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def _command(service: dict[str, Any]) -> list[str]:
    command = service.get("command", [])
    return shlex.split(command) if isinstance(command, str) else list(command)


def _check_app_target(target: str) -> None:
    """``module:attr`` names a module in this repo that serves ``attr``."""
    module, _, attr = target.partition(":")
    assert attr, f"{target!r} is not module:attr"
    path = ROOT / (module.replace(".", "/") + ".py")
    assert path.is_file(), f"{target!r}: {path} does not exist"
    source = path.read_text()
    # The examples build ``app`` lazily in a module __getattr__; a plain assignment works too.
    assert f'name == "{attr}"' in source or re.search(rf"^{attr}\s*=", source, re.M), (
        f"{path} does not define {attr}"
    )
    assert importlib.util.find_spec(module) is not None


@pytest.mark.timeout(10)
def test_compose_parses_and_has_the_services_with_health_checks() -> None:
    services = _compose()["services"]
    assert set(services) >= {"redis", "rabbitmq", "postgres", "owner", "consumer-1", "consumer-2"}
    for name, service in services.items():
        assert "healthcheck" in service, f"{name} has no health check"
        test = service["healthcheck"]["test"]
        assert test and test[0] in ("CMD", "CMD-SHELL"), f"{name}: bad health check {test!r}"


@pytest.mark.timeout(10)
def test_dependencies_exist_and_wait_for_health() -> None:
    services = _compose()["services"]
    for name, service in services.items():
        for dependency, condition in service.get("depends_on", {}).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            assert condition == {"condition": "service_healthy"}, name
    assert set(services["owner"]["depends_on"]) == {"redis", "postgres"}
    for consumer in ("consumer-1", "consumer-2"):
        assert set(services[consumer]["depends_on"]) == {"redis", "owner"}


@pytest.mark.timeout(10)
def test_app_services_build_this_repo_and_run_modules_that_exist() -> None:
    services = _compose()["services"]
    for name in ("owner", "consumer-1", "consumer-2"):
        service = services[name]
        context = ROOT / service["build"]
        assert (context / "Dockerfile").is_file(), f"{name}: no Dockerfile in {context}"
        command = _command(service)
        assert command[0] == "uvicorn", name
        _check_app_target(command[1])
    assert _command(services["owner"])[1] == "examples.owner_service:app"
    assert _command(services["consumer-1"])[1] == "examples.consumer_service:app"


@pytest.mark.timeout(10)
def test_environment_names_are_ones_the_examples_read() -> None:
    services = _compose()["services"]
    sources = {
        "owner": (ROOT / "examples/owner_service.py").read_text(),
        "consumer-1": (ROOT / "examples/consumer_service.py").read_text(),
    }
    for name, source in sources.items():
        for variable in services[name]["environment"]:
            assert f'"{variable}"' in source, f"{name}: {variable} is not read by the example"
    owner_url = services["consumer-1"]["environment"]["OWNER_URL"]
    assert owner_url.startswith("http://owner:")


@pytest.mark.timeout(10)
def test_published_ports_do_not_clash_and_match_the_test_servers() -> None:
    services = _compose()["services"]
    host_ports = [
        str(port).split(":")[0]
        for service in services.values()
        for port in service.get("ports", [])
    ]
    assert len(host_ports) == len(set(host_ports))
    # tests/conftest.py expects the servers on their standard ports.
    assert {"6379", "5672", "5432"} <= set(host_ports)
    assert services["postgres"]["environment"]["POSTGRES_DB"] == "test"


@pytest.mark.timeout(10)
def test_dockerfile_copies_paths_that_exist_and_runs_an_example() -> None:
    text = DOCKERFILE.read_text()
    copies = re.findall(r"^COPY\s+(.+)$", text, re.M)
    assert copies
    for line in copies:
        *sources, _dest = line.split()
        for source in sources:
            assert (ROOT / source).exists(), f"Dockerfile copies missing {source}"
    cmd = re.search(r"^CMD\s+(\[.*\])$", text, re.M)
    assert cmd is not None
    argv = yaml.safe_load(cmd.group(1))
    assert argv[0] == "uvicorn"
    _check_app_target(argv[1])
    installs = re.search(r"pip install '\.\[([a-z,]+)\]'", text)
    assert installs is not None
    extras = set(installs.group(1).split(","))
    pyproject = (ROOT / "pyproject.toml").read_text()
    for extra in extras:
        assert re.search(rf"^{extra}\s*=", pyproject, re.M), f"unknown extra {extra}"
