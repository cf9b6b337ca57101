"""The one table of options: every setting of modelpool, defined once (see option.py).

From it are made the command line (cli/parser.py), the environment's and the config
file's reading (sources.py), PoolConfig's and ServerConfig's defaults and checks
(config.py), and the configuration reference (docs/hooks/options_table.py). The pool's
topics are in pool_options.py; the HTTP front's and the logging options are here.
"""

from __future__ import annotations

from modelpool.settings.checks import (
    MiB,
    OrNone,
    Range,
    a_log_level,
    an_api_key,
    host_names,
    not_blank,
)
from modelpool.settings.option import COMMAND, HTTP, LOGGING, POOL, SERVER, TOPICS, Option
from modelpool.settings.parsers import (
    count_or_none,
    integer,
    log_format,
    log_level,
    number,
    text_value,
)
from modelpool.settings.pool_options import (
    CLUSTER_OPTIONS,
    LIBRARY_SETTINGS,
    MODEL_OPTIONS,
    OPERATION_OPTIONS,
)
from modelpool.settings.request_options import REQUEST_OPTIONS

HTTP_OPTIONS = [
    Option(
        "host",
        text_value,
        "127.0.0.1",
        "address to listen on",
        SERVER,
        topic=HTTP,
        check=not_blank("must not be empty"),
    ),
    Option(
        "port",
        integer,
        8080,
        "port to listen on; 0 picks a free one (the log names it)",
        SERVER,
        topic=HTTP,
        check=Range(0, maximum=65535, integer=True),
    ),
    Option(
        "max_body",
        integer,
        MiB,
        "largest request body in bytes; larger ones get 413",
        SERVER,
        topic=HTTP,
        check=Range(1, integer=True),
    ),
    Option(
        "body_timeout",
        number,
        60.0,
        "seconds a client may take to send its request body; slower ones get 408",
        SERVER,
        topic=HTTP,
        check=Range(0, above=True),
    ),
    Option(
        "keep_alive_timeout",
        number,
        75.0,
        "seconds an idle keep-alive connection stays open, and a connection may take to send "
        "its request headers; clients must not keep idle connections longer (httpx: 5 s), and "
        "a load balancer's idle timeout must be shorter. At --max-connections, the longest-"
        "idle connection is closed early for a new one",
        SERVER,
        topic=HTTP,
        check=Range(0, above=True),
    ),
    Option(
        "max_connections",
        integer,
        1000,
        "open client connections at most; at the limit one whose body comes below "
        "--min-body-rate (408), else the longest-idle one, is closed for a newcomer, and "
        "only when every one has a request in progress do newcomers wait",
        SERVER,
        topic=HTTP,
        check=Range(1, integer=True),
    ),
    Option(
        "min_body_rate",
        number,
        240.0,
        "bytes a second a request body must average, once --min-body-rate-grace has passed, "
        "to keep its connection at --max-connections: below it, the connection is the first "
        "closed for a newcomer, its request answered 408 (as Kestrel's minimum request body "
        "data rate); 0 turns it off. --body-timeout bounds slow bodies otherwise",
        SERVER,
        topic=HTTP,
        check=Range(0),
    ),
    Option(
        "min_body_rate_grace",
        number,
        5.0,
        "seconds a request body is given, from its headers on, before --min-body-rate applies",
        SERVER,
        topic=HTTP,
        check=Range(0),
    ),
    Option(
        "api_key",
        text_value,
        None,
        "require 'Authorization: Bearer KEY' on every path but /healthz and /readyz; "
        "prefer the variable, which other users cannot see in the process list",
        SERVER,
        secret=True,
        topic=HTTP,
        check=OrNone(an_api_key),
    ),
    Option(
        "allow_unauthenticated",
        None,
        False,
        "listen on a non-loopback address without --api-key",
        SERVER,
        topic=HTTP,
    ),
    Option(
        "allowed_hosts",
        text_value,  # split and checked by ServerConfig, as a config file's list is
        None,
        "host names or addresses separated by commas that requests may name in their Host "
        "header besides loopback names and the listening address, when no API key is set "
        "(others get 403: a page whose name was re-pointed at this machine must not reach "
        "the service); * for any; with an API key any name is answered",
        SERVER,
        topic=HTTP,
        check=host_names,
        lists=tuple,
    ),
    Option(
        "expose_model_stderr",
        None,
        False,
        "put the model's last stderr lines into 502 answers (they may hold paths and data)",
        SERVER,
        topic=HTTP,
    ),
    Option(
        "fast_predict",
        None,
        True,
        "answer POST /predict on the connection itself, without the web framework (the "
        "same answers at about half the cost); off, every request goes through it",
        SERVER,
        topic=HTTP,
    ),
]
LOGGING_OPTIONS = [
    Option("log_level", log_level, "INFO", "DEBUG, INFO, WARNING or ERROR", COMMAND, topic=LOGGING),
    Option(
        "log_format",
        log_format,
        "text",
        "text, or json: one JSON object per line with timestamp, level, logger, message, "
        "and request_id, worker and pid where they apply",
        COMMAND,
        topic=LOGGING,
    ),
    Option(
        "model_log_level",
        log_level,
        "INFO",
        "level at which the lines models print on stderr are logged: their warnings and "
        "tracebacks, which say why a model failed (they may hold users' data too: DEBUG "
        "keeps them out of an INFO log; /status keeps the last ones either way)",
        POOL,
        topic=LOGGING,
        check=a_log_level,
    ),
    Option(
        "model_stdout_level",
        log_level,
        "DEBUG",
        "level at which the lines models print on stdout, other than results, are logged: "
        "their start-up and chatter, which often echoes requests' data (model3 prints each "
        "input), so by default only a DEBUG log has them; INFO logs them",
        POOL,
        topic=LOGGING,
        check=a_log_level,
    ),
    Option(
        "model_log_rate",
        count_or_none,
        10,
        "lines a second each model may have logged, after a burst of 100 (its start-up, a "
        "traceback); past it lines are counted, and the count is logged every 10 s; "
        "0 logs every line",
        POOL,
        topic=LOGGING,
        check=OrNone(Range(1, integer=True)),
    ),
    Option(
        "access_log",
        None,
        False,
        "log one line per HTTP request: request id, status, queue wait, compute and total time",
        SERVER,
        topic=LOGGING,
    ),
]
# Every option a command takes, in the order of --help's topics.
OPTIONS = [
    *MODEL_OPTIONS,
    *REQUEST_OPTIONS,
    *HTTP_OPTIONS,
    *OPERATION_OPTIONS,
    *CLUSTER_OPTIONS,
    *LOGGING_OPTIONS,
]
BY_NAME = {option.name: option for option in [*OPTIONS, *LIBRARY_SETTINGS]}


def option(name: str) -> Option:
    """The option named `name` (a field of PoolConfig or ServerConfig, or a command's own)."""
    return BY_NAME[name]


__all__ = ["BY_NAME", "OPTIONS", "TOPICS", "Option", "option"]  # TOPICS: option.py's
