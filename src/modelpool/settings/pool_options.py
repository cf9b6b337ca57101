"""The options of the pool's own topics: how models run, what requests may hold, first
start and shutdown, and the cluster's shared queue; each a field of PoolConfig.

Part of the one table of options (options.py assembles it): see option.py for what an
entry holds. The settings of the Python API only, which no command takes, are here too,
so that every field of PoolConfig has its one definition.
"""

from __future__ import annotations

from modelpool.settings.checks import (
    MAX_WORKERS,
    MIN_MAX_LINE,
    MIN_RECLAIM_AFTER,
    MiB,
    OrNone,
    Range,
    a_bool,
    a_device_variable,
    a_node_name,
    a_queue_url,
    command_words,
    default_model_cmd,
    device_ids,
    not_blank,
    split_devices,
)
from modelpool.settings.models import MODEL_TABLE_OPTIONS
from modelpool.settings.option import (
    CLUSTER,
    LIBRARY,
    MODELS,
    OPERATIONS,
    POOL,
    Option,
)
from modelpool.settings.parsers import (
    command,
    count_or_auto,
    count_or_none,
    device_list,
    integer,
    mib_or_none,
    number,
    seconds_or_none,
    text_value,
    word_list,
)
from modelpool.settings.queueurl import redact_url

# How many models a pool may run; with a shared queue, a node may run none (PoolConfig).
WORKERS = Range(1, maximum=MAX_WORKERS, integer=True)

MODEL_OPTIONS = [
    Option(
        "workers",
        integer,
        4,
        "model processes kept warm, started in parallel",
        POOL,
        topic=MODELS,
        check=WORKERS,
    ),
    *MODEL_TABLE_OPTIONS,
    Option(
        "model_cmd",
        command,
        None,
        "command that starts one model, quoted as in a shell (no shell runs it); "
        "default: the bundled model3.py, run unbuffered by this Python",
        POOL,
        topic=MODELS,
        per_model=True,
        check=command_words,
        factory=default_model_cmd,
        lists=word_list,
    ),
    Option(
        "ready_line",
        text_value,
        "ready: Model-initialized",
        "a model is ready once it prints a line that starts with this",
        POOL,
        topic=MODELS,
        per_model=True,
        check=not_blank("must not be empty"),
    ),
    Option(
        "init_timeout",
        number,
        60.0,
        "seconds a model may take to print its ready line before it is killed and started again",
        POOL,
        topic=MODELS,
        per_model=True,
        check=Range(0, above=True),
    ),
    Option(
        "max_line",
        integer,
        16 * MiB,
        "longest line in bytes a model may print; a longer one is a model failure",
        POOL,
        topic=MODELS,
        per_model=True,
        check=Range(MIN_MAX_LINE, integer=True),
    ),
    Option(
        "backoff_initial",
        number,
        0.5,
        "seconds before restarting a model that failed on its own; doubles each time",
        POOL,
        topic=MODELS,
        per_model=True,
        check=Range(0, above=True),
    ),
    Option(
        "backoff_max",
        number,
        30.0,
        "longest delay between such restarts",
        POOL,
        topic=MODELS,  # at least --backoff-initial: a relation, which PoolConfig checks
        per_model=True,
    ),
    Option(
        "max_requests",
        count_or_none,
        None,
        "retire a model after this many answers, starting its replacement first so the "
        "pool never runs short (as gunicorn's max_requests); 0 never",
        POOL,
        topic=MODELS,
        per_model=True,
        check=OrNone(Range(1, integer=True)),
    ),
    Option(
        "max_requests_jitter",
        integer,
        0,
        "add a random 0..N to each model's --max-requests, so models are not all retired at once",
        POOL,
        topic=MODELS,
        per_model=True,
        check=Range(0, integer=True),
    ),
    Option(
        "model_max_rss",
        mib_or_none,
        None,
        "MiB of resident memory a model may use with the processes below it, checked every "
        "second: past it an idle model is replaced (its replacement first), and a computing "
        "one that passes it by more than 20 %% is killed and its request gets 502; 0 no limit",
        POOL,
        topic=MODELS,
        per_model=True,
        check=OrNone(Range(0, above=True)),
    ),
    Option(
        "preload",
        None,
        False,
        "load the model once, then fork every model from that warm template at its first "
        "read of stdin (as gunicorn's --preload): one load's time and memory for all of "
        "them, and replacements in milliseconds. Python models only (python [flags] "
        "script.py or -m module); one that is not safe to fork (threads, sockets, devices "
        "at that point) falls back to plain starts with a warning",
        POOL,
        topic=MODELS,
        per_model=True,
    ),
    Option(
        "preload_immortal",
        None,
        True,
        "with --preload on CPython 3.12 or 3.13 (the GIL build): once the template is "
        "ready, make its Python objects immortal, so that a model forked from it does not "
        "copy the pages of the objects it reads (their reference counts are no longer "
        "written); models that leave the walk a core of its own (at least one) are forked at "
        "once and serve meanwhile (they are replaced once it is done), the others are "
        "forked once it is done. "
        "Template objects are then never freed in a model: their finalizers and weak "
        "reference callbacks never run there",
        POOL,
        topic=MODELS,
        per_model=True,
    ),
    Option(
        "preload_max_private",
        number,
        25.0,
        "with --preload: a model forked from the template whose private memory (the pages "
        "it no longer shares with the template) passes this percentage of the template's "
        "resident memory, checked every second, is replaced by a fresh fork after it "
        "answers, its replacement first (copy-on-write brings a Python model's data back "
        "into every child as it reads it); 0 never",
        POOL,
        topic=MODELS,
        per_model=True,
        check=Range(0),
    ),
    Option(
        "model_threads",
        count_or_auto,
        None,
        "threads each model's C libraries may start (OpenMP, MKL, OpenBLAS, ...: "
        "OMP_NUM_THREADS and its kin in its environment, except those the service's "
        "environment sets), so that models do not oversubscribe the cores; default auto: "
        "the cores this service may use divided by --workers, at least 1; 0 leaves the "
        "environment alone",
        POOL,
        topic=MODELS,
        per_model=True,
        check=OrNone(Range(0, maximum=1024, integer=True)),
    ),
    Option(
        "devices",
        split_devices,  # each id is checked by PoolConfig
        None,
        "device ids separated by commas (0,1 or GPU-<uuid>,MIG-<uuid>): each worker gets "
        "one, in turn (as TorchServe does; a new worker the one with the fewest), and its "
        "models get it as MODELPOOL_DEVICE and as --device-env; a worker keeps its device "
        "across restarts, and its replacements (reload, recycling) take it over. With "
        "--preload the template sees no device: a model must touch its device at its "
        "first request, not while it loads",
        POOL,
        topic=MODELS,
        per_model=True,
        check=device_ids,
        lists=device_list,
    ),
    Option(
        "device_env",
        text_value,
        "CUDA_VISIBLE_DEVICES",
        "with --devices: the variable that also carries a model's device "
        "(HIP_VISIBLE_DEVICES for ROCm, ...); empty: MODELPOOL_DEVICE only",
        POOL,
        topic=MODELS,
        per_model=True,
        check=a_device_variable,
    ),
]
OPERATION_OPTIONS = [
    Option(
        "keep_trying",
        None,
        False,
        "keep restarting models that fail before any model was ever ready; without it, the "
        "service stops with exit code 3 and the model's last stderr lines once every "
        "model's first start failed (exited, or no ready line within --init-timeout)",
        POOL,
        topic=OPERATIONS,
        per_model=True,
        check=a_bool,
    ),
    Option(
        "unhealthy_after",
        seconds_or_none,
        60.0,
        "/healthz answers 503 once every model has kept failing on its own for this many "
        "seconds, so an orchestrator restarts the service; 0 never",
        POOL,
        topic=OPERATIONS,
        check=OrNone(Range(0, above=True)),
    ),
    Option(
        "drain_timeout",
        number,
        None,
        "on SIGTERM/SIGINT, seconds queued and in-flight requests still get; "
        "default: --timeout plus one second",
        POOL,
        topic=OPERATIONS,
        check=OrNone(Range(0, above=True)),
    ),
    Option(
        "exit_grace",
        number,
        5.0,
        "seconds a model gets to exit after its stdin is closed before it is killed",
        POOL,
        topic=OPERATIONS,
        check=Range(0),
    ),
]
CLUSTER_OPTIONS = [
    Option(
        "queue",
        text_value,
        None,
        "redis://HOST:PORT/DB (Redis or Valkey): take jobs from, and queue them in, one "
        "stream shared by every node of a cluster, so the first free model on any machine "
        "takes the oldest request; default: the in-process queue. With it, --workers 0 "
        "makes an HTTP front only",
        POOL,
        topic=CLUSTER,
        check=OrNone(a_queue_url),
        shown=redact_url,
    ),
    Option(
        "reclaim_after",
        number,
        10.0,
        "with --queue: seconds a job may stay with a node that stopped refreshing it (it died) "
        "before another node takes it back; it runs once more if still within its deadline",
        POOL,
        topic=CLUSTER,
        check=Range(MIN_RECLAIM_AFTER),
    ),
    Option(
        "node_name",
        text_value,
        None,
        "with --queue: this node's name in /status and /metrics; default host-pid-random",
        POOL,
        topic=CLUSTER,
        check=OrNone(a_node_name),
    ),
]
# Settings of the Python API only: no flag, variable or config-file key.
LIBRARY_SETTINGS = [
    Option(
        "stderr_tail",
        None,
        20,
        "a model's last stderr lines kept, for /status and for the errors that quote them",
        POOL,
        topic=LIBRARY,
        per_model=True,
        check=Range(1, integer=True),
    ),
    Option(
        "env",
        None,
        None,
        "variables added to every model's environment",
        POOL,
        topic=LIBRARY,
        per_model=True,
    ),
]
