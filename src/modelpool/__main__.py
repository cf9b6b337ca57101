"""`python -m modelpool` is the same as the `modelpool` command."""

from modelpool.cli.main import main

raise SystemExit(main())
