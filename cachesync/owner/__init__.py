"""The owner side beyond :class:`~cachesync.Publisher`: publishing what the database committed.

- :mod:`cachesync.owner.outbox`: the transactional outbox and its relay (``Outbox``,
  ``OutboxRelay``), for owners that write their changes to an outbox table.

Each subpackage needs its own extra (SQLAlchemy for the outbox): import them where used.
"""
