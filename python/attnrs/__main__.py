"""``python -m attnrs``: the command line of :mod:`attnrs.cli`."""

from attnrs.cli import main

raise SystemExit(main())
