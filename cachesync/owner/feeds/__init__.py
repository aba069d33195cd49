"""Change data capture: publish the committed changes of database tables, with no owner code.

``ChangeFeed(dsn, tables, publisher)`` reads PostgreSQL's logical decoding (``pgoutput``) or
the MySQL/MariaDB row binlog, and publishes inserts and updates as ``changed``, deletes as
``deleted`` and ``TRUNCATE`` as ``flush``, in commit order, at least once::

    from cachesync.owner.feeds import ChangeFeed, Table

    feed = ChangeFeed(
        "postgresql://app@db/shop",
        [Table("currencies", keys=("code",), version="version", value=True)],
        "redis://localhost:6379/0",
    )
    async with feed:
        ...

The drivers are the ``cdc`` extra: ``pip install 'cachesync[cdc]'``.
"""

from .base import Batch, ChangeFeed, FeedError, RowChange, Source, Table

__all__ = ["Batch", "ChangeFeed", "FeedError", "RowChange", "Source", "Table"]
