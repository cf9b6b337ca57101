"""--model-threads: one thread budget per model, so that N models on C cores do not run N times C
busy threads.

The C libraries under a Python model (OpenMP, which torch uses; MKL; OpenBLAS, which
numpy bundles; BLIS, numexpr; rayon, which HF tokenizers uses) each start as many threads
as the machine has cores, in every process. Four models on two cores then run eight busy
threads that take turns, which is many times slower than one thread each (torchrun sets
OMP_NUM_THREADS=1 per process for this reason). So each model gets a budget: the cores
this service may use divided by --workers, at least 1, set as each of `VARIABLES` in its
environment, except those the user set (in the service's environment, or a library
user's `PoolConfig.env`), which are the user's word. --model-threads N sets the budget,
0 leaves the environment alone.

Cores are `os.sched_getaffinity(0)` (taskset, cgroup cpusets), capped by a cgroup CPU
quota (`cpu.max`, a Kubernetes CPU limit; cgroup v1's cfs quota), rounded down, at least
1: a quota of 1.5 CPUs is one core's worth of threads that never wait on the quota.
With --devices the budget is the same: the cores are shared by every worker, whatever
its device. The budget is computed from --workers when the pool starts; a resize keeps it.

Under --preload the template loads with each variable at 1 and HF tokenizers' parallelism
off (`template_variables`), so that it starts no thread pool that a fork would lose;
each child gets its budget in its environment right after the fork, and the launcher
has the libraries the template already loaded take it (see _launcher.py).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from modelpool.settings.config import PoolConfig

VARIABLES = (
    "OMP_NUM_THREADS",  # OpenMP: torch's intra-op threads, MKL's and OpenBLAS's OpenMP builds
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "RAYON_NUM_THREADS",  # rust's rayon: HF tokenizers' batch encoding
)
TEMPLATE_ONLY = {"TOKENIZERS_PARALLELISM": "false"}  # rayon's pool cannot be kept to none
CGROUP = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class Budget:
    """A pool's thread budget, and where it came from."""

    threads: int | None  # per model; None: --model-threads 0, the environment is left alone
    source: str  # "auto" (cores / workers), "set" (--model-threads N) or "off" (0)
    cores: int  # the cores this service may use (see usable_cores)
    workers: int
    user_set: tuple[str, ...]  # VARIABLES the user set: theirs, not the budget's

    def snapshot(self) -> dict[str, Any]:
        """For /status."""
        return {
            "threads": self.threads,
            "source": self.source,
            "cores": self.cores,
            "workers": self.workers,
            "user_set": list(self.user_set),
        }

    def describe(self) -> str:
        """For the start-up log."""
        if self.threads is None:
            return "--model-threads 0: the models' thread variables are left as they are"
        theirs = f"; {', '.join(self.user_set)} as the environment sets" if self.user_set else ""
        why = (
            f"{self.cores} core(s) for {self.workers} worker(s)"
            if self.source == "auto"
            else "--model-threads"
        )
        return (
            f"each model may start {self.threads} thread(s) in its C libraries "
            f"(OMP_NUM_THREADS and its kin; {why}){theirs}"
        )


def plan(config: PoolConfig, environ: Mapping[str, str] | None = None) -> Budget:
    """The pool's budget: --model-threads, or the cores divided by --workers."""
    environ = os.environ if environ is None else environ
    given = {**environ, **(config.env or {})}
    user_set = tuple(name for name in VARIABLES if name in given)
    source = {0: "off", None: "auto"}.get(config.model_threads, "set")
    return Budget(per_model(config), source, usable_cores(), config.workers, user_set)


def per_model(config: PoolConfig) -> int | None:
    """Each model's threads: --model-threads N, or the cores divided by --workers (at
    least 1); None with --model-threads 0, which leaves the environment alone."""
    if config.model_threads == 0:
        return None
    if config.model_threads is not None:
        return config.model_threads
    return max(1, usable_cores() // max(1, config.workers))


def variables(config: PoolConfig, env: Mapping[str, str]) -> dict[str, str]:
    """The budget's variables that `env` (a model's environment so far) does not set.
    (Once a model start: not `plan`, which reads the whole environment again.)"""
    threads = per_model(config)
    if threads is None:
        return {}
    return {name: str(threads) for name in VARIABLES if name not in env}


def template_variables(config: PoolConfig) -> dict[str, str]:
    """What a --preload template's environment says instead: one thread each, and no
    thread pool for tokenizers, while it loads (its children get their budget)."""
    if config.model_threads == 0:
        return {}
    return {**dict.fromkeys(VARIABLES, "1"), **TEMPLATE_ONLY}


def child_threads(env: Mapping[str, str | None]) -> int | None:
    """The threads a forked child is to take, from its environment changes (see
    Template.env_changes): its OMP_NUM_THREADS, as torch reads it; None if unchanged."""
    value = env.get("OMP_NUM_THREADS")
    if value is None or not value.strip().isdigit() or int(value) < 1:
        return None
    return int(value)


@functools.cache
def usable_cores() -> int:
    """The cores this process may run on (its affinity), capped by a cgroup CPU quota.

    Read once, when the first pool starts: a start of 1024 models read the cgroup's files
    1024 times in one turn of the event loop (0.15 s of CPU here). A process's cores do
    not change under it (a new CPU limit restarts a pod)."""
    cores = len(os.sched_getaffinity(0))
    quota = cgroup_quota()
    if quota is not None:
        cores = min(cores, max(1, math.floor(quota)))
    return max(1, cores)


def cgroup_quota(root: Path = CGROUP) -> float | None:
    """CPUs' worth of time the cgroup allows (cgroup v2 cpu.max, or v1's cfs quota), or
    None if there is no quota. Read where the service's cgroup is mounted (a container's
    own, under a cgroup namespace)."""
    try:
        words = (root / "cpu.max").read_text().split()
        if len(words) == 2 and words[0] != "max":
            return int(words[0]) / int(words[1])
        return None
    except (OSError, ValueError, ZeroDivisionError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None
