"""`python -m resilient_ambassador` is the console script."""

from resilient_ambassador.cli import main

raise SystemExit(main())
