"""``python -m cachesync``: the command line."""

from .cli import main

raise SystemExit(main())
