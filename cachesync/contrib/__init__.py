"""Add-ons, each behind its extra, none imported by the core:

- :mod:`cachesync.contrib.fastapi` (``cachesync[fastapi]``): lifespans for owners and
  consumers, the ``GET /cachesync/state`` and ``/cachesync/explain`` routers;
- :mod:`cachesync.contrib.django` (``cachesync[django]``): a Django app;
- :mod:`cachesync.contrib.flask` (``cachesync[flask]``): a Flask extension;
- :mod:`cachesync.contrib.prometheus` (``cachesync[prometheus]``): ``PrometheusMetrics``;
- :mod:`cachesync.contrib.monitor`: ``ConsistencyMonitor``, which measures how often an
  instance serves stale data.
"""
