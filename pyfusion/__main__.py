"""``python -m pyfusion``: the command line (same as the ``pyfusion`` script)."""

from pyfusion.cli import main

raise SystemExit(main())
