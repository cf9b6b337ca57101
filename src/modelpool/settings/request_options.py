"""The options of what a request may hold and ask: how long it may wait and compute, how
big its queue is, how its class and deadline are treated, what its id and schema are;
each a field of PoolConfig, and each settable per model.

Part of the one table of options (pool_options.py puts them in it): see option.py for
what an entry holds.
"""

from __future__ import annotations

from modelpool.settings.checks import OneOf, OrNone, Range, a_schema, not_blank
from modelpool.settings.option import POOL, REQUESTS, Option
from modelpool.settings.parsers import (
    choice,
    integer,
    number,
    schema_file,
    seconds_or_none,
    text_value,
)

CANCEL_POLICIES = ("auto", "always", "never")

REQUEST_OPTIONS = [
    Option(
        "timeout",
        number,
        10.0,
        "seconds a model may compute one request; past it the model is killed and "
        "replaced, and the request gets 504",
        POOL,
        topic=REQUESTS,
        per_model=True,
        check=Range(0, above=True),
    ),
    Option(
        "max_queue",
        integer,
        256,
        "requests that may wait for a model; more get 503",
        POOL,
        topic=REQUESTS,
        per_model=True,
        check=Range(1, integer=True),
    ),
    Option(
        "queue_timeout",
        seconds_or_none,
        120.0,
        "seconds a request may wait for a free model before it gets 503; 0 waits forever",
        POOL,
        topic=REQUESTS,
        per_model=True,
        check=OrNone(Range(0, above=True)),
    ),
    Option(
        "id_field",
        text_value,
        None,
        "for models that echo a field: send a unique id under this name in every request "
        "and accept a result only if it carries the same id (off by default)",
        POOL,
        topic=REQUESTS,
        per_model=True,
        check=OrNone(not_blank("must be a non-empty field name")),
    ),
    Option(
        "request_schema",
        schema_file,
        None,
        "JSON Schema file every request must match; others get 400 before a model sees them",
        POOL,
        topic=REQUESTS,
        per_model=True,
        check=OrNone(a_schema),
    ),
    Option(
        "priority_aging",
        seconds_or_none,
        10.0,
        "seconds after which a waiting request counts as one of the class above "
        "(X-Request-Priority: low, then normal), so that no class starves; 0 never",
        POOL,
        topic=REQUESTS,
        per_model=True,
        check=OrNone(Range(0)),  # 0: never, as on the command line
    ),
    Option(
        "cancel_computing",
        choice(*CANCEL_POLICIES),
        "auto",
        "when a request's client goes away while a model computes it: always kill and "
        "replace the model (as a timeout does), never (it finishes, its answer is "
        "dropped), or auto: kill it when its replacement is a fork (--preload), not when "
        "it would cost a whole load",
        POOL,
        topic=REQUESTS,
        per_model=True,
        check=OneOf(CANCEL_POLICIES),
    ),
]
