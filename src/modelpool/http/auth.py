"""API key check: `Authorization: Bearer <key>`, compared in constant time.

Probes (`/healthz`, `/readyz`) stay open, so an orchestrator needs no secret, and so
does the status page (`/`), which holds no data: it asks the browser's user for the key
and sends it with each of its calls to `/status`. Everything else, present and future,
needs the key once one is set. The check runs before the
body is read, so a client without the key cannot make the service read a large body
(at most what the lingering close drops, a megabyte: see listener.PromptTCPServer._close).
Once a key is set it is the protection against web pages too: no page can send it, so
the Host and Origin checks of a service without a key (origins.py) are not made.
"""

from __future__ import annotations

import hmac

OPEN_PATHS = frozenset({"/", "/healthz", "/readyz"})


class ApiKey:
    def __init__(self, key: str) -> None:
        self._key = key.encode("utf-8")

    def allows(self, path: str, authorization: str | None) -> bool:
        """True if the request may go on: an open path, or the right bearer token."""
        if path in OPEN_PATHS:
            return True
        if authorization is None:
            return False
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(token.strip().encode("utf-8", "surrogateescape"), self._key)
