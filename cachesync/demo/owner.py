"""The owner service of ``cachesync demo``: currencies over REST, changes published as events.

:class:`Owner` holds the reference data in a dict and commits every change as a new version,
then publishes ``changed("currencies", code, version=v)`` through its embedded
:class:`~cachesync.Publisher`. :class:`OwnerApp` puts a small REST API in front of it, a plain
ASGI app, and :func:`owner_client` calls that app in-process through ``httpx.ASGITransport``:
the demo needs no web framework, no server and no free port, only cachesync's core
dependencies (a plain ``pip install cachesync``).

The owner also remembers when each version was committed, so the demo can tell a read that
returned an old version from one that was simply concurrent with the change.
"""

from __future__ import annotations

import bisect
import json
import random
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..publisher import Publisher

__all__ = [
    "CURRENCY_NAMES",
    "NAMESPACE",
    "OWNER_BASE_URL",
    "Currency",
    "Owner",
    "OwnerApp",
    "build_app",
    "owner_client",
]

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

NAMESPACE = "currencies"
"""The namespace the owner publishes its changes in."""

CURRENCY_NAMES: dict[str, str] = {
    "USD": "US Dollar",
    "EUR": "Euro",
    "JPY": "Yen",
    "GBP": "Pound Sterling",
    "CNY": "Yuan Renminbi",
    "AUD": "Australian Dollar",
    "CAD": "Canadian Dollar",
    "CHF": "Swiss Franc",
    "HKD": "Hong Kong Dollar",
    "SGD": "Singapore Dollar",
    "SEK": "Swedish Krona",
    "KRW": "Won",
    "NOK": "Norwegian Krone",
    "NZD": "New Zealand Dollar",
    "INR": "Indian Rupee",
    "MXN": "Mexican Peso",
    "TWD": "New Taiwan Dollar",
    "ZAR": "Rand",
    "BRL": "Brazilian Real",
    "DKK": "Danish Krone",
    "PLN": "Zloty",
    "THB": "Baht",
    "ILS": "New Israeli Sheqel",
    "IDR": "Rupiah",
    "CZK": "Czech Koruna",
    "AED": "UAE Dirham",
    "TRY": "Turkish Lira",
    "HUF": "Forint",
    "CLP": "Chilean Peso",
    "SAR": "Saudi Riyal",
    "PHP": "Philippine Peso",
    "MYR": "Malaysian Ringgit",
    "COP": "Colombian Peso",
    "RON": "Romanian Leu",
    "PEN": "Sol",
    "BHD": "Bahraini Dinar",
    "BGN": "Bulgarian Lev",
    "ARS": "Argentine Peso",
    "KWD": "Kuwaiti Dinar",
    "QAR": "Qatari Rial",
    "OMR": "Rial Omani",
    "EGP": "Egyptian Pound",
    "NGN": "Naira",
    "KES": "Kenyan Shilling",
    "MAD": "Moroccan Dirham",
    "VND": "Dong",
    "PKR": "Pakistan Rupee",
    "BDT": "Taka",
    "UAH": "Hryvnia",
    "ISK": "Iceland Krona",
    "JOD": "Jordanian Dinar",
    "LKR": "Sri Lanka Rupee",
    "KZT": "Tenge",
    "GHS": "Ghana Cedi",
    "UYU": "Peso Uruguayo",
    "DOP": "Dominican Peso",
    "CRC": "Costa Rican Colon",
    "TND": "Tunisian Dinar",
    "RSD": "Serbian Dinar",
    "GEL": "Lari",
}
"""The currencies the owner serves, most traded first (the demo's reads favour the top)."""


class Currency(BaseModel):
    """One row of the owner's data: ``rate`` units per US dollar, at ``version``."""

    model_config = ConfigDict(frozen=True)

    code: str
    name: str
    rate: float
    version: int


class RateChange(BaseModel):
    """The body of ``PUT /currencies/{code}``."""

    rate: float = Field(gt=0)


class Owner:
    """The owner's data and its change feed.

    :meth:`commit` stores a new version of a currency, :meth:`publish` announces it; the
    ``PUT`` route does both through :meth:`update`. Versions of a code start at 1 and grow by
    one per commit, and :meth:`version_at` says which version was committed at a given time
    (on ``clock``, ``time.perf_counter`` by default).
    """

    def __init__(
        self,
        publisher: Publisher,
        *,
        rng: random.Random | None = None,
        carry_values: bool = False,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        rng = rng or random.Random()
        self.publisher = publisher
        self.carry_values = carry_values
        self.clock = clock
        self.currencies: dict[str, Currency] = {
            code: Currency(code=code, name=name, rate=_initial_rate(code, rng), version=1)
            for code, name in CURRENCY_NAMES.items()
        }
        start = clock()
        self._commits: dict[str, list[float]] = {code: [start] for code in self.currencies}
        self.gets = 0
        self.updates = 0

    def commit(self, code: str, rate: float) -> tuple[Currency, float]:
        """Store ``rate`` as the next version of ``code``; return it and its commit time.

        Raises ``KeyError`` for a code the owner does not serve.
        """
        current = self.currencies[code]
        new = current.model_copy(update={"rate": rate, "version": current.version + 1})
        committed = self.clock()
        self.currencies[code] = new
        self._commits[code].append(committed)
        self.updates += 1
        return new, committed

    async def publish(self, currency: Currency) -> None:
        """Tell every consumer that ``currency`` changed: they drop their copy, or with
        ``carry_values`` the event carries the new row for consumers in refresh mode."""
        value = currency.model_dump() if self.carry_values else None
        await self.publisher.changed(
            NAMESPACE, currency.code, version=currency.version, value=value
        )

    async def update(self, code: str, rate: float) -> Currency:
        """Commit, then publish: the owner's write path."""
        currency, _ = self.commit(code, rate)
        await self.publish(currency)
        return currency

    def version_at(self, code: str, when: float) -> int:
        """The version of ``code`` that was the owner's current one at time ``when``."""
        return bisect.bisect_right(self._commits[code], when)


def _initial_rate(code: str, rng: random.Random) -> float:
    return 1.0 if code == "USD" else round(rng.lognormvariate(0.0, 2.0), 6)


def build_app(owner: Owner) -> OwnerApp:
    """The owner's REST API as a plain ASGI app (see :class:`OwnerApp`)."""
    return OwnerApp(owner)


class OwnerApp:
    """The owner's REST API, a plain ASGI application with no web framework under it.

    ``GET /currencies`` lists every row, ``GET``/``PUT /currencies/{code}`` read and change
    one (``PUT`` takes ``{"rate": R}`` with ``R > 0``), and ``GET /cachesync/state`` answers
    what the owner's publisher has sent, in the shape of
    :func:`cachesync.contrib.fastapi.state_router`. Errors answer ``{"detail": ...}`` with
    404, 405 or 422. Any ASGI server serves it; the demo calls it in-process through
    :func:`owner_client`.
    """

    def __init__(self, owner: Owner) -> None:
        self.owner = owner

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            raise RuntimeError(f"the demo owner serves HTTP only, not {scope['type']!r}")
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        status, payload = await self._route(scope["method"], scope["path"], body)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})

    async def _route(self, method: str, path: str, body: bytes) -> tuple[int, bytes]:
        owner = self.owner
        if path == "/cachesync/state":
            if method != "GET":
                return _error(405, "method not allowed")
            return 200, json.dumps(self._state()).encode()
        if path == "/currencies":
            if method != "GET":
                return _error(405, "method not allowed")
            rows = [currency.model_dump() for currency in owner.currencies.values()]
            return 200, json.dumps(rows).encode()
        if not path.startswith("/currencies/") or "/" in path[len("/currencies/") :]:
            return _error(404, "not found")
        code = path[len("/currencies/") :]
        if method == "GET":
            owner.gets += 1
            currency = owner.currencies.get(code)
            if currency is None:
                return _error(404, f"unknown currency {code!r}")
            return 200, currency.model_dump_json().encode()
        if method == "PUT":
            if code not in owner.currencies:
                return _error(404, f"unknown currency {code!r}")
            try:
                change = RateChange.model_validate_json(body)
            except ValidationError as exc:
                errors = exc.json(include_url=False, include_input=False)
                return 422, f'{{"detail": {errors}}}'.encode()
            currency = await owner.update(code, change.rate)
            return 200, currency.model_dump_json().encode()
        return _error(405, "method not allowed")

    def _state(self) -> dict[str, Any]:
        publisher = self.owner.publisher
        state = dict(publisher.state())
        channel = state.pop("channel")
        return {
            "source": publisher.source,
            "heartbeat_interval": publisher.heartbeat_interval,
            "channels": {channel: state},
            "outbox": {},
        }


def _error(status: int, detail: str) -> tuple[int, bytes]:
    return status, json.dumps({"detail": detail}).encode()


OWNER_BASE_URL = "http://owner.demo"
"""The base URL of :func:`owner_client`: requests never leave the process."""


def owner_client(app: OwnerApp, *, timeout: float = 5.0) -> httpx.AsyncClient:
    """An HTTP client of ``app`` that calls it in-process (``httpx.ASGITransport``): no
    socket and no server, so the demo needs nothing beyond cachesync's core dependencies."""
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url=OWNER_BASE_URL, timeout=timeout
    )
