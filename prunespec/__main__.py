"""``python -m prunespec``: the command line."""

from .cli import main

raise SystemExit(main())
