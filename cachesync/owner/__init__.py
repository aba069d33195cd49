"""The owner side beyond :class:`~cachesync.Publisher`: publishing what the database committed.

- :mod:`cachesync.owner.outbox`: the transactional outbox and its relay (``Outbox``,
  ``OutboxRelay``), for owners that write their changes to an outbox table.
- :mod:`cachesync.owner.feeds`: change feeds that read the database's own log (PostgreSQL
  logical decoding, the MySQL/MariaDB row binlog), for owners with no publishing code.

Each subpackage needs its own extra (``outbox``, ``cdc``): import them where used.
"""
