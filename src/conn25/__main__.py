"""``python -m conn25`` is the ``conn25d`` command."""

from .daemon.cli import main

raise SystemExit(main())
