"""The transactional outbox: changes committed with the data, published by a relay.

Publishing from the request handler after the commit loses the event if the process dies or the
broker is down in between (the dual write). Instead the owner writes an outbox row in the same
transaction as its data, and :class:`OutboxRelay` publishes the committed rows::

    async with session.begin():
        currency.rate = new_rate
        currency.version += 1
        Outbox.add(session, "currencies", currency.code, version=currency.version,
                   value=CurrencyOut.model_validate(currency))

    async with OutboxRelay(engine, "redis://localhost:6379/0"):
        ...   # runs beside the app; see cachesync.contrib.fastapi.owner_lifespan

The modules: :mod:`.model` (the table, ``Outbox.add``, the DDL), :mod:`.rows` (a row as the
event to publish), :mod:`.relay` (the loop), :mod:`.election` (one relay per channel on
PostgreSQL), :mod:`.database` (what the database paths share, and the choice of one), and one
module per database path: :mod:`.generic` (SQLite and any SQLAlchemy database) and
:mod:`.postgresql` (asyncpg: LISTEN/NOTIFY, the election, the hot statements).
"""

from .model import DEFAULT_CHANNEL, Outbox, notify_channel
from .relay import OutboxRelay

__all__ = ["DEFAULT_CHANNEL", "Outbox", "OutboxRelay", "notify_channel"]
