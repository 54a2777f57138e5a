"""``python -m fetchpool``: the command line (see ``fetchpool --help``)."""

from __future__ import annotations

from .cli import main

raise SystemExit(main())
