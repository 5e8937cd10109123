"""``python -m embedstream``: the same as the ``embedstream`` command."""

from embedstream.cli import main

raise SystemExit(main())
