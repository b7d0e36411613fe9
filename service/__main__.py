from rnnserve.cli import main

raise SystemExit(main())
