"""The Django app against the real PostgreSQL and Redis: a real project (tests/djangoproject)
with its migrations, Django's test client, and events observed on the broker itself."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from .conftest import REDIS_URL, require_server
from .test_runner import _applied

pytestmark = [pytest.mark.redis, pytest.mark.postgres]


@pytest.fixture(scope="module")
def project() -> Iterator[dict[str, Any]]:
    require_server("redis")
    require_server("postgres")
    channel = f"django-{uuid.uuid4().hex[:12]}"
    os.environ["CACHESYNC_TEST_URL"] = REDIS_URL
    os.environ["CACHESYNC_TEST_CHANNEL"] = channel
    os.environ["DJANGO_SETTINGS_MODULE"] = "tests.djangoproject.settings"
    import django
    from django.db import connection

    django.setup()  # starts the client in the background (settings.CACHESYNC)
    from cachesync.contrib.django import get_client, get_publisher

    old_name = connection.creation.create_test_db(verbosity=0, autoclobber=True)
    try:
        yield {"channel": channel}
    finally:
        get_publisher().close()
        get_client().stop_background()
        connection.creation.destroy_test_db(old_name, verbosity=0)


@pytest.fixture
def events(project: dict[str, Any]) -> Iterator[Any]:
    """Reads the channel's events (not heartbeats) straight from Redis."""
    pubsub = redis.Redis.from_url(REDIS_URL).pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(project["channel"])
    assert pubsub.get_message(timeout=5) is None  # the subscribe confirmation

    def read_until(key: str, timeout: float = 5.0) -> list[dict[str, Any]]:
        """Every event up to and including the first that names ``key``."""
        seen = []
        deadline = time.monotonic() + timeout
        while True:
            message = pubsub.get_message(timeout=max(0.0, deadline - time.monotonic()))
            assert message is not None, f"no event for {key!r} within {timeout}s: {seen}"
            event = json.loads(message["data"])
            if event["op"] == "heartbeat":
                continue
            seen.append(event)
            if key in event["keys"]:
                return seen

    try:
        yield read_until
    finally:
        pubsub.close()


@pytest.fixture
def usd(events: Any) -> Iterator[Any]:
    """The USD row (its create's event is read by the test: it comes first)."""
    from tests.djangoproject.catalog.cache import get_currency
    from tests.djangoproject.catalog.models import Currency

    row = Currency.objects.create(code="USD", rate=1.0)
    get_currency.cache_clear()
    try:
        yield row
    finally:
        Currency.objects.all().delete()


class Rollback(Exception):
    pass


def test_a_view_serves_the_cache_and_a_commit_reaches_it(usd: Any, events: Any) -> None:
    from django.test import Client

    from cachesync.contrib.django import get_client
    from tests.djangoproject.catalog.cache import reads

    events("USD")  # the create's event
    client = Client()
    before = len(reads)
    assert client.get("/currencies/USD").json()["rate"] == 1.0
    assert client.get("/currencies/USD").json()["rate"] == 1.0
    assert len(reads) == before + 1  # the second read was a hit
    applied = _applied(get_client())
    reply = client.post("/currencies/USD", json.dumps({"rate": 2.0}), "application/json")
    assert reply.json() == {"version": 2}
    (event,) = events("USD")
    assert event["version"] == 2 and event["value"]["rate"] == 2.0
    assert applied.wait(5)
    assert client.get("/currencies/USD").json() == {"code": "USD", "rate": 2.0, "version": 2}


def test_a_rollback_publishes_nothing_a_commit_publishes_once(usd: Any, events: Any) -> None:
    from django.db import transaction

    from cachesync.contrib.django import get_publisher, publish_on_commit

    events("USD")
    with pytest.raises(Rollback), transaction.atomic():
        usd.rate, usd.version = 5.0, 2
        usd.save()
        publish_on_commit("currencies", "EUR", version=9)
        raise Rollback
    seq = get_publisher().publisher.seq
    with transaction.atomic():
        publish_on_commit("currencies", "GBP", version=3)
        assert get_publisher().publisher.seq == seq  # nothing before the commit
    assert get_publisher().publisher.seq == seq + 1
    # Only the committed change, once: nothing of the rolled-back block came before it.
    (event,) = events("GBP")
    assert event["ns"] == "currencies" and event["version"] == 3
    usd.refresh_from_db()
    with transaction.atomic():
        usd.delete()
    (deleted,) = events("USD")
    assert deleted["op"] == "delete" and deleted["version"] == 1


def test_outbox_rows_survive_a_broker_outage(
    usd: Any, events: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from django.core.management import CommandError, call_command
    from django.db import transaction

    from cachesync.contrib.django import _config
    from cachesync.contrib.django.models import OutboxEvent

    events("USD")
    monkeypatch.setitem(_config().options, "OUTBOX", True)
    with pytest.raises(Rollback), transaction.atomic():
        usd.rate, usd.version = 7.0, 2
        usd.save()
        raise Rollback
    assert not OutboxEvent.objects.exists()  # rolled back with the change
    with transaction.atomic():
        usd.rate, usd.version = 3.0, 2
        usd.save()
    (row,) = OutboxEvent.objects.all()
    assert row.sent_at is None and row.keys == ["USD"] and row.version == 2

    # The broker is unreachable: the relay gives up on time, the row stays pending.
    with pytest.raises(CommandError, match="pending"):
        call_command(
            "cachesync_relay", "--url", "redis://127.0.0.1:1/0", "--until-idle", "--timeout", "1"
        )
    row.refresh_from_db()
    assert row.sent_at is None

    # Back: the row is published once and marked sent.
    call_command("cachesync_relay", "--until-idle", "--timeout", "10")
    (event,) = events("USD")
    assert event["version"] == 2 and event["value"]["rate"] == 3.0
    row.refresh_from_db()
    assert row.sent_at is not None
    OutboxEvent.objects.all().delete()
