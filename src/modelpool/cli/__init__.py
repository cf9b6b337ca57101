"""The command line: `modelpool serve` and its friends."""
