"""Integrations with web frameworks: :mod:`cachesync.contrib.flask` (a Flask extension) and
:mod:`cachesync.contrib.django` (a Django app). Each needs its extra:
``pip install 'cachesync[flask]'`` or ``pip install 'cachesync[django]'``."""
