"""Queue URLs (--queue): which queue backend a URL names, what is wrong with one, in words
for its user, and how to show one without its password.

Only what is true of every queue URL is here. Each queue backend registers its URL
schemes with the check of what such a URL may say, and of what it needs installed
(`register_queue_scheme`, called by queues/backends.py: settings sits below the queues
and imports none of them). `modelpool.PoolConfig`, the command line and the pool
import that registry before they check a configuration, so a mistake stops the command
at once, with its flag's name, before any model starts; the pool checks the URL again
when it opens its queue (see queues/open.py). No message or log line holds the password.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class QueueScheme:
    """What settings knows of a queue backend's URLs: the checks its backend registered."""

    url_problem: Callable[[str], str | None]  # what is wrong with a URL; None if nothing
    client_problem: Callable[[], str | None]  # what is missing to use it; None if nothing


_SCHEMES: dict[str, QueueScheme] = {}


def register_queue_scheme(scheme: str, checks: QueueScheme) -> None:
    """Let `scheme://` URLs name a queue, checked by `checks` (queues/backends.py)."""
    _SCHEMES[scheme] = checks


def queue_schemes() -> list[str]:
    """The URL schemes a queue may have, in the order their backends registered them."""
    return list(_SCHEMES)


def redact_url(url: str) -> str:
    """`url` without its password (`user:PW@host` becomes `user:***@host`), for every
    message and log line that shows it.

    It reads no more of the URL than it must, so a malformed one (`rediss//:PW@h`) is
    redacted too; anything before the last `@` may hold a password.
    """
    head, at, tail = url.rpartition("@")
    if not at:
        return url
    start = head.find("//")
    start = 0 if start < 0 else start + 2
    user, colon, secret = head[start:].partition(":")
    if colon:
        return f"{head[:start]}{user}:***@{tail}" if secret else url
    # No colon: the whole of it may be a password (redis://PW@host), or a user name only.
    return f"{head[:start]}***@{tail}" if user else url


def queue_url_problem(url: str) -> str | None:
    """What is wrong with a queue URL, in words for its user; None if nothing is.

    A URL must be `SCHEME://...` with a registered scheme; the rest is its backend's to
    check. No message holds the URL's password.
    """
    if not _SCHEMES:
        return None  # no backend registered in this process: the pool checks it when it opens
    scheme, separator, _ = url.partition("://")
    checks = _SCHEMES.get(scheme) if separator else None
    if checks is None:
        return f"must be a {_either([f'{name}://' for name in _SCHEMES])} URL"
    return checks.url_problem(url)


def queue_client_problem(url: str) -> str | None:
    """What is missing to use the queue `url` names (its backend's client library, an
    extra), in words for its user; None if nothing is, or if the URL names no queue."""
    checks = _SCHEMES.get(url.partition("://")[0])
    return None if checks is None else checks.client_problem()


def _either(words: list[str]) -> str:
    """`a`, `a or b`, `a, b or c`."""
    return f"{', '.join(words[:-1])} or {words[-1]}" if len(words) > 1 else "".join(words)
