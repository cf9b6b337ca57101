"""Request ids: what names a request in the log, in `X-Request-ID` and in error bodies.

Request ids name requests in logs; they grant nothing, so they need not be secret, and a
generator seeded once from the OS spares a system call per request (secrets.token_hex).
"""

from __future__ import annotations

import random
import re

REQUEST_ID_HEADER = "X-Request-ID"
SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")
_request_ids = random.Random()


def request_id_from(header: str | None) -> str:
    """The client's X-Request-ID if it is a sane token, else a new one."""
    if header is not None and SANE_REQUEST_ID.fullmatch(header):
        return header
    return f"{_request_ids.getrandbits(64):016x}"
