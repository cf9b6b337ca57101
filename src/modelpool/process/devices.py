"""--devices: one accelerator per worker, shared out in turn, as TorchServe does.

A device is only a name (0, GPU-<uuid>, MIG-<uuid>) passed to the model in its
environment: as MODELPOOL_DEVICE, and as the variable --device-env names
(CUDA_VISIBLE_DEVICES by default), which CUDA, ROCm and the frameworks above them read
when they first touch a device. modelpool opens no device itself.

A worker is given its device when it is made, and keeps it for its whole life: every
model it restarts gets the same one. A surge replacement (a reload, a recycle, a memory
limit) is given the device of the worker it replaces, so each device keeps its share.
A new worker (at start, or a resize up) gets the device fewest serving workers have,
the first of them in --devices order on a tie: from an even spread that is plain
round-robin (0, 1, 0, 1), and after a shrink it fills the gaps first. A shrink retires
workers from the devices that have the most, so the spread stays even both ways.

A --preload template is given no device: MODELPOOL_DEVICE is unset and the device
variable is empty (CUDA reads that as no device at all). Each child forked from it is
given its worker's device in its os.environ right after the fork, before the model's
code runs again, and where /proc/PID/environ shows it (see _launcher.py); a model that
touches a device only at its first request then initialises it on its own device.
"""

from __future__ import annotations

import collections
import heapq
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, TypeVar

log = logging.getLogger("modelpool.pool")

if TYPE_CHECKING:
    from modelpool.settings.config import PoolConfig

DEVICE_VAR = "MODELPOOL_DEVICE"
ROOM_VAR = "MODELPOOL_ENV_ROOM"  # as _launcher.py's: room for a forked child's variables
ROOM = 512  # bytes of it: MODELPOOL_DEVICE and a device variable fit, however long
# config.py lets a device id (128) and a variable's name (128) be

W = TypeVar("W")


def variables(config: PoolConfig, device: str | None) -> dict[str, str]:
    """What a model's environment says of its device; {} without --devices.

    `device` None is a --preload template's: no device (the variable empty, so the
    template sees none rather than every device the service sees), and ROOM_VAR, which
    the launcher hides from the model and each child writes its own variables over
    (see _launcher.py's _EnvTail). They go last in the environment (model_environment).
    """
    if not config.devices:
        return {}
    if device is None:
        blank = {} if config.device_env is None else {config.device_env: ""}
        return {**blank, ROOM_VAR: "." * ROOM}
    found = {DEVICE_VAR: device}
    if config.device_env is not None:
        found[config.device_env] = device
    return found


def warn_unused(devices: Sequence[str] | None, workers: int) -> None:
    """Say so if fewer workers than devices leave some devices unused."""
    if devices and 0 < workers < len(devices):
        idle = ", ".join(devices[workers:])
        log.warning(
            "--devices names %d devices but --workers is %d: no model runs on %s",
            len(devices),
            workers,
            idle,
        )


def least_used(devices: Sequence[str], taken: Iterable[str | None]) -> str:
    """The device fewest workers have (`taken`: the serving workers' devices); the
    first in `devices` order on a tie."""
    counts = collections.Counter(device for device in taken if device is not None)
    return min(devices, key=lambda device: (counts[device], devices.index(device)))


def to_retire(
    workers: Sequence[W], count: int, device_of: Callable[[W], str | None], cost: Callable[[W], int]
) -> list[W]:
    """`count` of `workers` to retire: each from a device with the most workers left,
    the cheapest (`cost`) of them first. Without devices, simply the cheapest ones.

    A heap of the devices, so shrinking a pool of a thousand takes one short turn of
    the event loop (a count per retirement would take the square of it).
    """
    groups: dict[str | None, list[W]] = {}
    for worker in sorted(workers, key=cost):  # stable: in the pool's order on a tie
        groups.setdefault(device_of(worker), []).append(worker)
    lists = list(groups.values())
    heap = [(-len(members), cost(members[0]), order, 0) for order, members in enumerate(lists)]
    heapq.heapify(heap)
    chosen: list[W] = []
    while heap and len(chosen) < count:
        left, _, order, taken = heapq.heappop(heap)
        members = lists[order]
        chosen.append(members[taken])
        if taken + 1 < len(members):
            heapq.heappush(heap, (left + 1, cost(members[taken + 1]), order, taken + 1))
    return chosen
