"""The owner service of ``cachesync demo``: currencies over REST, changes published as events.

:class:`Owner` holds the reference data in a dict and commits every change as a new version,
then publishes ``changed("currencies", code, version=v)`` through its embedded
:class:`~cachesync.Publisher`. :func:`build_app` puts a small FastAPI app in front of it, and
:class:`OwnerServer` serves that app with uvicorn inside the running event loop on a free port
of 127.0.0.1, so the demo needs no server of its own.

The owner also remembers when each version was committed, so the demo can tell a read that
returned an old version from one that was simply concurrent with the change.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import random
import socket
import time
from collections.abc import Callable, Generator
from types import TracebackType
from typing import Self

import uvicorn
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, ConfigDict, Field

from ..contrib.fastapi import state_router
from ..publisher import Publisher

__all__ = ["CURRENCY_NAMES", "NAMESPACE", "Currency", "Owner", "OwnerServer", "build_app"]

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


def build_app(owner: Owner) -> FastAPI:
    """The owner's REST API: ``GET``/``PUT /currencies/{code}`` and ``GET /cachesync/state``."""
    app = FastAPI(title="cachesync demo owner", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/currencies/{code}")
    async def get_currency(code: str) -> Currency:
        owner.gets += 1
        currency = owner.currencies.get(code)
        if currency is None:
            raise HTTPException(status_code=404, detail=f"unknown currency {code!r}")
        return currency

    @app.put("/currencies/{code}")
    async def put_currency(code: str, change: RateChange) -> Currency:
        if code not in owner.currencies:
            raise HTTPException(status_code=404, detail=f"unknown currency {code!r}")
        return await owner.update(code, change.rate)

    app.include_router(state_router(owner.publisher))
    return app


class _EmbeddedServer(uvicorn.Server):
    # uvicorn installs its own SIGINT handler while it serves; inside a host program that
    # handler would swallow the host's Ctrl-C, so the host keeps signals to itself.
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class OwnerServer:
    """Serves an ASGI app with uvicorn in the running event loop, on a free 127.0.0.1 port.

    ``async with OwnerServer(app) as server:`` returns once the socket accepts connections;
    ``server.url`` is the base URL. Leaving the block stops the server and waits for it.
    """

    def __init__(self, app: FastAPI, *, host: str = "127.0.0.1") -> None:
        self.app = app
        self.host = host
        self.url = ""
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        # Binding the socket here, rather than passing port=0 to uvicorn, lets us know the
        # port before serving, with no window in which another process could take it. The
        # explicit IPPROTO_TCP matters: asyncio turns Nagle off only on sockets that name it,
        # and with Nagle on every response waits ~40 ms for a delayed ACK.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, 0))
        except OSError:
            sock.close()
            raise
        port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            lifespan="off",
            log_config=None,
            log_level="warning",
            access_log=False,
            ws="none",
            timeout_graceful_shutdown=2,
        )
        server = _EmbeddedServer(config)
        self._server = server
        self._task = asyncio.create_task(server.serve(sockets=[sock]), name="demo-owner")
        while not server.started:
            if self._task.done():
                sock.close()
                await self._task  # raises what stopped it
                raise RuntimeError("the owner's HTTP server stopped while starting")
            await asyncio.sleep(0.005)
        self.url = f"http://{self.host}:{port}"
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._task is not None:
            await self._task
