"""``python -m ffkern`` is the ``ffkern`` command."""

from ffkern.cli import main

raise SystemExit(main())
