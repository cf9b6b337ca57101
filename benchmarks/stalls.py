"""Stalls of the event loop while a big pool starts and shrinks, by the clock.

Runs tests/shrink_probe.py (a pool of N tiny models started, then shrunk to 2, while a
task that sleeps a millisecond notes the longest gap between its wake-ups) a few times
for each size, and prints the longest turn of the loop by the clock and in CPU time of
the loop's thread (besides the garbage collector's passes, shown apart), against these
targets, by the clock, for a quiet machine:

  start 1024 models      longest turn under 0.25 s (the code before took over 0.5 s)
  shrink 256 -> 2        longest turn under 0.1 s (before: 0.13-0.4 s)
  shrink 1024 -> 2       longest turn under 1 s (before: 4.6-12.8 s)

The clock's figures include the time the service waited for a core, so they hold only
on a quiet machine (the load average is printed at the start and the end): the test
suite (tests/test_shrink_stall.py) bounds the CPU time instead, which does not grow
with other work on the machine.

Run: python benchmarks/stalls.py [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROBE = ROOT / "tests" / "shrink_probe.py"
CASES = [(256, "tokens"), (1024, "adopt")]  # the reaper as the test runs each size
TARGETS = {("start", 1024): 0.25, ("shrink", 256): 0.1, ("shrink", 1024): 1.0}


def probe(size: int, reaper: str) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, str(PROBE), str(size), reaper],
        capture_output=True,
        check=True,
        text=True,
        timeout=600,
    )
    figures: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs of each size")
    args = parser.parse_args()
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    rows = []
    for size, reaper in CASES:
        runs = [probe(size, reaper) for _ in range(args.runs)]
        for phase, wall, cpu in [
            ("start", "start_stall", "start_stall_cpu"),
            ("shrink", "stall", "stall_cpu"),
        ]:
            target = TARGETS.get((phase, size))
            walls = [run[wall] for run in runs]
            cpus = [run[cpu] for run in runs]
            collector = max(run["collector_cpu"] for run in runs)
            rows.append((f"{phase} {size}", walls, cpus, collector, target))
    print(f"load average at end:   {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print()
    print(
        f"{'':<12}{'longest turn, clock (ms)':<30}{'CPU (ms)':<24}"
        f"{'collector (ms)':<16}target (clock)"
    )
    for label, walls, cpus, collector, target in rows:
        wall_text = " / ".join(f"{w * 1000:.0f}" for w in walls)
        cpu_text = " / ".join(f"{c * 1000:.0f}" for c in cpus)
        if target is None:
            verdict = ""
        else:
            verdict = f"< {target * 1000:.0f} ms: {'met' if max(walls) < target else 'NOT met'}"
        print(f"{label:<12}{wall_text:<30}{cpu_text:<24}{collector * 1000:<16.0f}{verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
