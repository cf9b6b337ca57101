"""Which `Host` and `Origin` a request may come with when no API key protects the service.

Loopback is not a trust boundary once a browser runs on the machine: every page it opens,
from anywhere, can send requests to 127.0.0.1. There are two ways, and a check for each
(as Jupyter's server has them):

- **Requests from another origin.** A page may send a POST that needs no preflight (a
  `text/plain` body, a form) to any address; the browser sends it, naming the page in
  `Origin`, and only hides the answer from the page. So a request that may change
  something (every method but GET, HEAD and OPTIONS) whose `Origin` is not the service's
  own (the host and port the request was sent to, as its `Host` says) is refused.
  `Origin: null` (a sandboxed frame, a local file) is foreign too. A request without
  `Origin` is no browser's request from another origin (browsers send it with every
  POST of a page), and goes on.
- **DNS rebinding.** A page at evil.example has its name re-pointed to 127.0.0.1: to the
  browser the service is then the page's own origin, whose answers it may read. But the
  browser still sends `Host: evil.example`: so every request, on every path, whose
  `Host` is not one of the service's own names is refused: loopback names and addresses,
  the address it listens on (when that is every address, 0.0.0.0 or ::, any address: a
  rebinding page has a name, not an address), and `--allowed-hosts`. A request without
  `Host` (HTTP/1.0) is no browser's, and goes on. The port in `Host` is not looked at.

With an API key neither check is made (`guard_for` gives None): the key is the
protection. A page cannot send it (a request from another origin with `Authorization`
needs a preflight the service never grants; a rebinding page does not know the key),
and a proxy or a Kubernetes Service may then name the service as it likes.

The quart app (app.py) refuses such requests with 403; the fast path (fastpath.py)
leaves them to it. The admin routes' own rule, a JSON body only, is admin.py's.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

from modelpool.settings.config import ServerConfig

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})  # the methods that change nothing
LOOPBACK_NAMES = frozenset({"localhost"})
DEFAULT_PORTS = {"http": 80, "https": 443}
ANY = "*"  # in --allowed-hosts: any name
PORT = re.compile(r"[0-9]{1,5}")
SHOWN = 200  # characters of a refused header that the answer and the log show

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Authority:
    """`host[:port]`, as `Host` and an origin give it: the name in lower case, without
    a trailing dot or an IPv6 address's brackets; the port, if one is given."""

    name: str
    port: int | None


def parse_authority(text: str) -> Authority | None:
    """The authority `text` gives, or None if it is no `host[:port]`."""
    text = text.strip().lower()
    if text.startswith("["):  # an IPv6 address: [::1] or [::1]:8080
        name, bracket, rest = text[1:].partition("]")
        if not bracket or not _address(name) or (rest and not rest.startswith(":")):
            return None
        port = rest[1:] if rest else ""
    elif text.count(":") > 1:
        return None  # an IPv6 address without brackets is no host
    else:
        name, _, port = text.partition(":")
    name = name.removesuffix(".")
    if not name or (port and not PORT.fullmatch(port)) or (port and int(port) > 65535):
        return None
    return Authority(name, int(port) if port else None)


def _address(text: str) -> Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


class Origins:
    """The names the service answers to, and the judge of each request's Host and Origin.

    `listening`: where it listens (the bound socket's address, and the name it was
    told to listen on, if any); `allowed`: --allowed-hosts.
    """

    def __init__(self, listening: Iterable[str], allowed: Iterable[str] = ()) -> None:
        names = set(LOOPBACK_NAMES)
        addresses: set[Address] = set()
        self._any_name = self._any_address = False
        given = [(host, True) for host in listening] + [(host, False) for host in allowed]
        for text, is_listening in given:
            host = text.strip().lower().removesuffix(".").strip("[]")
            if host == ANY and not is_listening:
                self._any_name = True
            elif (address := _address(host)) is None:
                names.add(host)
            elif is_listening and address.is_unspecified:
                self._any_address = True  # 0.0.0.0 or ::: every address of the machine
            else:
                addresses.add(address)
        self._names = frozenset(names)
        self._addresses = frozenset(addresses)
        # the Host of nearly every request is one of a few: judged once each
        self._host_allowed = lru_cache(maxsize=256)(self._judge_host)

    def refusal(self, method: str, host: str | None, origin: str | None) -> str | None:
        """Why a request of `method` with these `Host` and `Origin` headers (None: not
        sent) is refused, for its answer; None if it may go on."""
        if host and not self._host_allowed(host):
            return (
                f"Host {_shown(host)} is not a name of this service: it answers loopback "
                "names and addresses and the address it listens on; add a name with "
                "--allowed-hosts, or set an API key"
            )
        if method not in SAFE_METHODS and origin is not None and not _same(origin, host):
            return (
                f"a {method} from the page of another origin ({_shown(origin)}) is refused: "
                "only the service's own pages may send requests from a browser"
            )
        return None

    def _judge_host(self, host: str) -> bool:
        authority = parse_authority(host)
        if authority is None:
            return False
        if self._any_name or authority.name in self._names:
            return True
        address = _address(authority.name)
        if address is None:
            return False
        return address.is_loopback or self._any_address or address in self._addresses


@lru_cache(maxsize=256)  # a browser sends the same pair again and again
def _same(origin: str, host: str | None) -> bool:
    """Whether `origin` (scheme://host[:port]) is the origin `host` names. The scheme is
    not compared (a proxy in front may end TLS), only the name and the port it implies."""
    scheme, separator, rest = origin.strip().lower().partition("://")
    if not separator or scheme not in DEFAULT_PORTS or not host:
        return False  # `null`, or no origin a page of this service could have
    theirs, ours = parse_authority(rest), parse_authority(host)
    if theirs is None or ours is None:
        return False
    default = DEFAULT_PORTS[scheme]
    return theirs.name == ours.name and (theirs.port or default) == (ours.port or default)


def _shown(value: str) -> str:
    """A header's value as an answer or a log line shows it: quoted, and not too long."""
    return repr(value if len(value) <= SHOWN else value[:SHOWN] + "...")


def guard_for(config: ServerConfig, listening: Iterable[str]) -> Origins | None:
    """The judge of the service's requests, or None when an API key is set (the key then
    protects it, whatever a request's Host and Origin); `listening` as for Origins."""
    if config.api_key is not None:
        return None
    return Origins(listening, config.allowed_hosts or ())
