"""Benchmarks for cachesync: micro benchmarks and a side-by-side strategy comparison.

    python -m benchmarks            # short run (about 5 minutes): `make bench`
    python -m benchmarks --full     # the documented long run: `make bench-full`
    python -m benchmarks --help     # every knob

Results go to ``benchmarks/results/`` (``RESULTS.md`` and PNG plots). Nothing here runs in CI as
a timed test; ``tests/test_benchmarks_smoke.py`` only keeps the code from rotting.
"""
