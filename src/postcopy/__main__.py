"""`python -m postcopy` runs the command-line interface."""

from postcopy.cli.main import main

raise SystemExit(main())
