"""``python -m synthlesion``: the ``synthlesion`` command."""

from synthlesion.cli import main

raise SystemExit(main())
