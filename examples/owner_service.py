"""Example owner service: the source of truth for currencies and customers.

Every write changes the row and adds an outbox row in one transaction; the outbox relay
publishes it (at least once, in order) to the consumers. Run it with::

    uvicorn examples.owner_service:app --port 8000

Configuration (environment variables):

- ``DATABASE_URL``: ``sqlite+aiosqlite:///./owner.db`` by default; a PostgreSQL URL
  (``postgresql://user@host/db``) gets the asyncpg driver and LISTEN/NOTIFY wake-ups.
- ``CACHESYNC_URL``: the broker, ``redis://127.0.0.1:6379/0`` by default.
- ``CACHESYNC_CHANNEL``: ``cachesync`` by default.
- ``CACHESYNC_HEARTBEAT_INTERVAL``: seconds between heartbeats, ``1.0`` by default.
- ``OUTBOX_POLL_INTERVAL``: the relay's polling fallback, ``0.5`` seconds by default.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from fastapi import FastAPI, Header, HTTPException, Response
from pydantic import BaseModel
from sqlalchemy import String, select
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from cachesync.contrib.fastapi import owner_lifespan, state_router
from cachesync.owner.outbox import Outbox, OutboxRelay

from .models import Currency, CurrencyIn, Customer, CustomerIn

log = logging.getLogger("examples.owner")


class Base(DeclarativeBase):
    pass


class CurrencyRow(Base):
    __tablename__ = "currencies"

    code: Mapped[str] = mapped_column(String(16), primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    rate: Mapped[float]
    # Versions keep growing across a delete and a re-create (the row is only marked deleted),
    # so a consumer never takes a re-created entry for an older one.
    version: Mapped[int] = mapped_column(default=0)
    deleted: Mapped[bool] = mapped_column(default=False)


class CustomerRow(Base):
    __tablename__ = "customers"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    email: Mapped[str] = mapped_column(String(200))
    tier: Mapped[str] = mapped_column(String(32))
    version: Mapped[int] = mapped_column(default=0)
    deleted: Mapped[bool] = mapped_column(default=False)


Row = TypeVar("Row", CurrencyRow, CustomerRow)


def async_database_url(url: str) -> str:
    """``url`` with an async driver: asyncpg for PostgreSQL, aiosqlite for SQLite."""
    for plain, driver in (
        ("postgresql://", "postgresql+asyncpg://"),
        ("postgres://", "postgresql+asyncpg://"),
        ("sqlite://", "sqlite+aiosqlite://"),
    ):
        if url.startswith(plain):
            return driver + url[len(plain) :]
    return url


def create_app(
    database_url: str | None = None,
    cachesync_url: str | None = None,
    channel: str | None = None,
) -> FastAPI:
    """The owner app; arguments override the environment variables."""
    database_url = async_database_url(
        database_url or os.environ.get("DATABASE_URL", "sqlite+aiosqlite:///./owner.db")
    )
    cachesync_url = cachesync_url or os.environ.get("CACHESYNC_URL", "redis://127.0.0.1:6379/0")
    channel = channel or os.environ.get("CACHESYNC_CHANNEL", "cachesync")
    engine = create_async_engine(database_url, pool_pre_ping=True)
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    relay = OutboxRelay(
        engine,
        cachesync_url,
        channel,
        heartbeat_interval=float(os.environ.get("CACHESYNC_HEARTBEAT_INTERVAL", "1.0")),
        poll_interval=float(os.environ.get("OUTBOX_POLL_INTERVAL", "0.5")),
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Tables first, so the relay's first round finds the outbox.
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
            await Outbox.create_table(conn)
        try:
            async with owner_lifespan(relay)(app):
                yield
        finally:
            await engine.dispose()

    app = FastAPI(title="cachesync example: owner", lifespan=lifespan)
    app.include_router(state_router(relay))
    app.state.relay = relay

    async def save(
        row_cls: type[Row], out: type[BaseModel], ns: str, key: str, fields: dict[str, Any]
    ) -> Any:
        async with sessions.begin() as session:
            # FOR UPDATE (on PostgreSQL): concurrent writers of one key take turns, so
            # versions and outbox ids follow the commit order of that key.
            row = await session.get(row_cls, key, with_for_update=True)
            if row is None:
                row = row_cls(**{_pk(row_cls): key}, version=0, **fields)
                session.add(row)
            else:
                for name, value in fields.items():
                    setattr(row, name, value)
            row.deleted = False
            row.version += 1
            value = out.model_validate(row)
            # Same transaction as the data: committed together or not at all.
            Outbox.add(session, ns, key, version=row.version, value=value, channel=channel)
        relay.wake()  # publish now rather than at the next poll (SQLite has no NOTIFY)
        return value

    async def remove(row_cls: type[Row], ns: str, key: str) -> None:
        async with sessions.begin() as session:
            row = await session.get(row_cls, key, with_for_update=True)
            if row is None or row.deleted:
                raise HTTPException(404, f"{key} not found")
            row.deleted = True
            row.version += 1
            Outbox.add(session, ns, key, op="delete", version=row.version, channel=channel)
        relay.wake()

    async def read(
        row_cls: type[Row], out: type[BaseModel], key: str, if_none_match: str | None
    ) -> Any:
        async with sessions() as session:
            row = await session.get(row_cls, key)
            if row is None or row.deleted:
                raise HTTPException(404, f"{key} not found")
            etag = f'"{row.version}"'
            if if_none_match == etag:
                return Response(status_code=304, headers={"ETag": etag})
            body = out.model_validate(row).model_dump_json()
        return Response(body, media_type="application/json", headers={"ETag": etag})

    async def read_all(row_cls: type[Row], out: type[BaseModel]) -> list[Any]:
        async with sessions() as session:
            rows = await session.scalars(
                select(row_cls).where(row_cls.deleted.is_(False)).order_by(_pk_column(row_cls))
            )
            return [out.model_validate(row) for row in rows]

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"ok": True, "outbox": relay.stats()}

    @app.get("/currencies", response_model=list[Currency])
    async def list_currencies() -> list[Any]:
        return await read_all(CurrencyRow, Currency)

    @app.get("/currencies/{code}", response_model=Currency)
    async def get_currency(code: str, if_none_match: str | None = Header(None)) -> Any:
        return await read(CurrencyRow, Currency, code, if_none_match)

    @app.put("/currencies/{code}", response_model=Currency)
    async def put_currency(code: str, body: CurrencyIn, response: Response) -> Any:
        value = await save(CurrencyRow, Currency, "currencies", code, body.model_dump())
        response.headers["ETag"] = f'"{value.version}"'
        return value

    @app.delete("/currencies/{code}", status_code=204)
    async def delete_currency(code: str) -> None:
        await remove(CurrencyRow, "currencies", code)

    @app.get("/customers", response_model=list[Customer])
    async def list_customers() -> list[Any]:
        return await read_all(CustomerRow, Customer)

    @app.get("/customers/{customer_id}", response_model=Customer)
    async def get_customer(customer_id: str, if_none_match: str | None = Header(None)) -> Any:
        return await read(CustomerRow, Customer, customer_id, if_none_match)

    @app.put("/customers/{customer_id}", response_model=Customer)
    async def put_customer(customer_id: str, body: CustomerIn, response: Response) -> Any:
        value = await save(CustomerRow, Customer, "customers", customer_id, body.model_dump())
        response.headers["ETag"] = f'"{value.version}"'
        return value

    @app.delete("/customers/{customer_id}", status_code=204)
    async def delete_customer(customer_id: str) -> None:
        await remove(CustomerRow, "customers", customer_id)

    return app


def _pk(row_cls: type[Base]) -> str:
    return "code" if row_cls is CurrencyRow else "id"


def _pk_column(row_cls: type[Base]) -> Any:
    return getattr(row_cls, _pk(row_cls))


_app: FastAPI | None = None


def __getattr__(name: str) -> Any:
    # ``app`` is built on first access (``uvicorn examples.<module>:app``), not at import, so
    # importing the module for create_app() reads no environment and opens nothing.
    global _app
    if name == "app":
        if _app is None:
            _app = create_app()
        return _app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
