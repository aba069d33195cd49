"""``python -m benchmarks`` (``make bench``); ``--full`` for the long run (``make bench-full``)."""

from __future__ import annotations

if __name__ == "__main__":
    from benchmarks.runner import main

    raise SystemExit(main())
