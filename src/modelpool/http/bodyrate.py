"""The minimum rate at which a request body must arrive, once it has had a grace period,
for its connection to keep its place when the service is at --max-connections.

A request counts as in progress from its headers on, and a connection with a request in
progress is never closed to make room for a newcomer (connections.py): its model may be
computing. But while its body is still arriving, what the connection waits on is its
client, as an idle one does. Clients that send their bodies a few bytes a second could
thus hold every connection until --body-timeout, and keep everyone else out.

The rule is Kestrel's `MinRequestBodyDataRate` (240 bytes a second after a 5 s grace, by
default): the body's average rate since its headers came, once the grace has passed.
Unlike Kestrel, a slow body is not cut off for being slow, only when the service is at
its limit and a newcomer waits: --body-timeout bounds it otherwise. Then the slowest
such connection is the first to go (answered 408, see http1.HTTP11Protocol), before any
idle one.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MinBodyRate:
    """`bytes_per_second` on average, once `grace` seconds have passed; 0 turns it off."""

    bytes_per_second: float
    grace: float

    def too_slow(self, body: BodyArrival, now: float) -> bool:
        """Whether `body` is arriving below the rate (and past its grace) at `now`."""
        if self.bytes_per_second <= 0 or body.since is None:
            return False
        elapsed = now - body.since
        return elapsed >= self.grace and body.received < self.bytes_per_second * elapsed


class BodyArrival:
    """How the body of a connection's current request is arriving: since when it has been
    awaited (None: no body is awaited), and how many bytes of it have come."""

    def __init__(self) -> None:
        self.since: float | None = None
        self.received = 0

    def began(self, now: float) -> None:
        """A request's headers have come: its body is awaited from now."""
        self.since = now
        self.received = 0

    def came(self, size: int) -> None:
        self.received += size

    def ended(self) -> None:
        """The body has come to its end (or will not come: the request was answered)."""
        self.since = None
