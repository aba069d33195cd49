"""Shared fixtures: which real servers are up, and fresh names so tests never share state.

Under ``CI=true`` a test that needs a server fails when the server is missing; elsewhere it is
skipped with a message that says how to start it.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from .clusters import RabbitMQCluster, RedisClusterDeployment, SentinelDeployment

REDIS_URL = os.environ.get("CACHESYNC_TEST_REDIS", "redis://127.0.0.1:6379/0")
AMQP_URL = os.environ.get("CACHESYNC_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672/")
NATS_URL = os.environ.get("CACHESYNC_TEST_NATS", "nats://127.0.0.1:4222")
POSTGRES_DSN = os.environ.get(
    "CACHESYNC_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"
)
MARIADB_DSN = os.environ.get("CACHESYNC_TEST_MARIADB", "mysql://root@127.0.0.1:3306/test")

_SERVERS = {
    "redis": ("127.0.0.1", 6379),
    "rabbitmq": ("127.0.0.1", 5672),
    "postgres": ("127.0.0.1", 5432),
    "nats": ("127.0.0.1", 4222),
    "mariadb": ("127.0.0.1", 3306),
}


def server_up(name: str) -> bool:
    host, port = _SERVERS[name]
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def require_server(name: str) -> None:
    """Fail under CI, skip elsewhere, when server ``name`` is not reachable."""
    if server_up(name):
        return
    host, port = _SERVERS[name]
    message = (
        f"{name} is not reachable on {host}:{port}; start it with `docker compose up -d {name}`"
    )
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def redis_url() -> str:
    require_server("redis")
    return REDIS_URL


@pytest.fixture
def amqp_url() -> str:
    require_server("rabbitmq")
    return AMQP_URL


@pytest.fixture
def nats_url() -> str:
    require_server("nats")
    return NATS_URL


@pytest.fixture
def postgres_dsn() -> str:
    require_server("postgres")
    return POSTGRES_DSN


@pytest.fixture(scope="session")
def sentinel() -> Iterator[SentinelDeployment]:
    """A Redis master, a replica and 3 sentinels on loopback ports, for this test run."""
    from .clusters import sentinel_deployment
    from .engine_tools import require_binary

    require_binary("redis-server")
    deployment = sentinel_deployment()
    try:
        yield deployment
    finally:
        deployment.group.stop()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterDeployment]:
    """A Redis Cluster of 3 primaries and 3 replicas on loopback ports, for this test run."""
    from .clusters import redis_cluster as build
    from .engine_tools import require_binary

    require_binary("redis-server")
    deployment = build()
    try:
        yield deployment
    finally:
        deployment.group.stop()


@pytest.fixture(scope="session")
def rabbitmq_nodes() -> Iterator[RabbitMQCluster]:
    """A RabbitMQ cluster of 3 nodes of its own on loopback ports, for this test run (about
    18 s to start; only runs that select a test using it pay that)."""
    from .clusters import rabbitmq_cluster, rabbitmq_scripts
    from .engine_tools import require_binary

    if rabbitmq_scripts() is None:
        require_binary("rabbitmq-server")
    cluster = rabbitmq_cluster()
    try:
        yield cluster
    finally:
        cluster.group.stop()


@pytest.fixture
def mariadb_dsn() -> str:
    require_server("mariadb")
    return MARIADB_DSN


@pytest.fixture
def unique() -> str:
    """A fresh name for channels, buses and tables, so tests never see each other's events."""
    return uuid.uuid4().hex[:12]
