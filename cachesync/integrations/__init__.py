"""Glue for web frameworks; each module imports its framework, installed as an extra.

- :mod:`cachesync.integrations.fastapi` (``pip install 'cachesync[fastapi]'``): lifespans for
  the owner and for consumers, and the ``GET /cachesync/state`` router.
"""
