"""The owner side without publishing code in the request path: change feeds that read the
database's own log (:mod:`cachesync.owner.feeds`)."""
