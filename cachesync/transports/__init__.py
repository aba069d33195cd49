"""Transports: one module (or subpackage) per broker family, each moving opaque bytes on named
channels; :mod:`cachesync.transports.base` holds the contract they keep and ``from_url``, which
picks one by URL scheme. Each is imported only when its scheme is used, so a broker's client
library is needed only by those who use it."""
