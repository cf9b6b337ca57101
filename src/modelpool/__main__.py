"""`python -m modelpool` is the same as the `modelpool` command."""

from .cli import main

raise SystemExit(main())
