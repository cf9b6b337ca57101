"""What a Redis queue URL may say (`redis://`, `rediss://`, `redis+sentinel://`), checked
before any model starts; and whether the Redis client is installed.

Only the standard library: the configuration is checked with it (see queues/backends.py)
before coredis, or anything else of the Redis queue, is imported.
"""

from __future__ import annotations

import math
import os
import re
from urllib.parse import parse_qs, urlsplit

SCHEMES = ("redis", "rediss", "redis+sentinel")
SENTINEL_URL = re.compile(
    r"redis\+sentinel://(?:[^@/]*@)?(?P<hosts>[^:,/]+:\d+(?:,[^:,/]+:\d+)*)/[^/?#]+(?:/\d+)?"
)
DB_PATH = re.compile(r"/?(\d+)?")
HOST_PORT = re.compile(r"(?P<host>\[[0-9A-Fa-f:.]+\]|[^:\[\]]+)(?::(?P<port>.*))?")
TRUTH_WORDS = frozenset({"0", "1", "t", "f", "true", "false", "y", "n", "yes", "no"})
# The query options of a redis:// or rediss:// URL that modelpool passes on to coredis,
# and what each must be; the rest (stream_timeout, max_connections, noreply, ...) are
# modelpool's to set, or would break it.
QUEUE_OPTIONS: dict[str, str] = {
    "db": "a database number",
    "client_name": "a name",
    "connect_timeout": "a number of seconds",
}
TLS_OPTIONS: dict[str, str] = {
    "ssl_cert_reqs": "one of none, optional, required",
    "ssl_check_hostname": "one of true/false, yes/no, 1/0",
    "ssl_ca_certs": "a CA file or directory",
    "ssl_certfile": "a certificate file",
    "ssl_keyfile": "a key file",
}


def redis_url_problem(url: str) -> str | None:
    """What is wrong with a Redis queue URL, in words for its user; None if nothing is.
    No message holds the URL's password."""
    if url.startswith("redis+sentinel://"):
        match = SENTINEL_URL.fullmatch(url)
        if match is None:
            return "must be redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE[/DB]"
        for host in match["hosts"].split(","):
            if not 1 <= int(host.rpartition(":")[2]) <= 65535:
                return f"has a port out of 1..65535 in {host!r}"
        return None
    parts = urlsplit(url)
    where = HOST_PORT.fullmatch(parts.netloc.rpartition("@")[2])
    if where is None:
        return "must name a host: redis://HOST:PORT/DB"
    port = where["port"]
    if port is not None and not (port.isdigit() and 1 <= int(port) <= 65535):
        return f"must have a port from 1 to 65535, not {port!r}"
    if parts.fragment:
        return "must have no #fragment"
    if DB_PATH.fullmatch(parts.path) is None:
        return f"must end in /DB, a database number, not {parts.path!r}"
    tls = url.startswith("rediss://")
    try:
        query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError:
        return f"has a query that is not NAME=VALUE&...: {parts.query!r}"
    known = {**QUEUE_OPTIONS, **TLS_OPTIONS} if tls else QUEUE_OPTIONS
    for name, values in query.items():
        if name not in known:
            hint = " (it needs rediss://)" if name in TLS_OPTIONS else ""
            return f"has an unknown option {name!r}{hint}; known: {', '.join(sorted(known))}"
        value = values[-1]
        if not _option_valid(name, value):
            return f"option {name} must be {known[name]}, not {value!r}"
    if ("ssl_certfile" in query) != ("ssl_keyfile" in query):
        return "options ssl_certfile and ssl_keyfile go together"
    return None


def redis_client_problem() -> str | None:
    """What is missing to use a Redis queue, in words for its user; None if nothing is.

    The Redis client is an extra (`modelpool[redis]`), so a pool without a shared queue
    installs nothing it does not use. It is imported here, as the queue would import it,
    so that a missing or broken client stops the command before any model starts.
    """
    try:
        import coredis  # noqa: F401
    except ImportError as exc:
        return (
            f"needs the Redis client, which is not installed ({exc}): "
            "pip install 'modelpool[redis]'"
        )
    return None


def _option_valid(name: str, value: str) -> bool:
    if name == "db":
        return value.isdigit()
    if name == "client_name":
        return bool(value) and not any(c.isspace() for c in value)
    if name == "connect_timeout":
        try:
            return math.isfinite(float(value)) and float(value) > 0
        except ValueError:
            return False
    if name == "ssl_cert_reqs":
        return value in ("none", "optional", "required")
    if name == "ssl_check_hostname":
        return value.lower() in TRUTH_WORDS
    if name == "ssl_ca_certs":
        return os.path.exists(value)
    return os.path.isfile(value)  # ssl_certfile, ssl_keyfile
