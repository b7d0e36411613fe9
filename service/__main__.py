"""`python -m rnnserve`: the `rnnserve` command (`rnnserve.cli.main`)."""

from rnnserve.cli import main

raise SystemExit(main())
