"""Several models behind one service: their names, their tables of options, and how the
slots (`--workers`) are shared among them at start.

A model is declared by a table of the config file (`[models.v3]`, with its own
`model-cmd` and any option the table marks per model), by `--model NAME=COMMAND` (the
top-level options for the rest), or by `PoolConfig(models={"v3": {...}})`. Every option
a table leaves out is the top level's. With none declared, the service runs one model,
named `default`, as it always did.

`--workers` is then the budget of all models: how many model processes compute at once,
whichever model they run. Each model has `min-workers` (kept whatever the demand) and
`max-workers`; at start each gets its minimum, and the rest is dealt out one by one in
the order the models were declared, so two models on 4 slots start with 2 each. From
then on slots follow demand (pool/slots.py).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from modelpool.settings.checks import MAX_WORKERS, ConfigError, OrNone, Range, not_blank
from modelpool.settings.option import MODELS, POOL, Option
from modelpool.settings.parsers import BadValue, command, integer, text_value

DEFAULT_NAME = "default"  # the one model of a service that declares none
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")  # a path segment as it is
NAME_RULE = "1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit"


def model_entry(text: str) -> dict[str, dict[str, Any]]:
    """`--model NAME=COMMAND`: a model with that command and the top-level options."""
    name, equals, words = text.partition("=")
    name = name.strip()
    if not equals or not name:
        raise BadValue(f"must be NAME=COMMAND, as v3='python3 model3.py', got {text!r}")
    if not NAME.match(name):
        raise BadValue(f"model name {name!r} must be {NAME_RULE}")
    return {name: {"model_cmd": command(words)}}


@dataclass(frozen=True)
class ModelTables:
    """The check of `models`: a mapping from each model's name to its table of options
    (by option name; `max-queue` is read as `max_queue`). What each option's value may
    be is PoolConfig's to judge (it builds each model's config, see config.py)."""

    def __call__(self, name: str, value: Any) -> dict[str, dict[str, Any]]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise ConfigError(name, "must map each model's name to a table of its options")
        tables: dict[str, dict[str, Any]] = {}
        for model, table in value.items():
            if not isinstance(model, str) or not NAME.match(model):
                raise ConfigError(name, f"model name {model!r} must be {NAME_RULE}")
            if not isinstance(table, Mapping):
                raise ConfigError(name, f"{model}: must be a table of options, got {table!r}")
            tables[model] = {str(key).replace("-", "_"): each for key, each in table.items()}
        return tables


def configs_of(config: Any) -> dict[str, Any]:
    """Each model's PoolConfig, by name (see PoolConfig.model_configs); `config` is the
    top level's, whose checks have passed. ConfigError for a table that makes no sense."""
    if config.workers == 0 and not config.queue:
        raise ConfigError("workers", "must be at least 1 (0 is for a cluster's front, --queue)")
    if not config.models:
        if config.default_model is not None:
            raise ConfigError("default_model", "names a model, but none is declared (--model)")
        return {DEFAULT_NAME: config}
    names = ", ".join(config.models)
    if config.queue:
        raise ConfigError(
            "models",
            "are served one per service in a cluster (--queue): run a service, and its "
            "worker nodes, for each model",
        )
    if config.default_model is not None and config.default_model not in config.models:
        raise ConfigError("default_model", f"{config.default_model!r} is not one of: {names}")
    per_model = {
        each.name for each in dataclasses.fields(config) if each.metadata["option"].per_model
    }
    built = {
        name: _config_of(config, name, table, per_model) for name, table in config.models.items()
    }
    bounds: dict[str, tuple[int, int]] = {}
    for name, model in built.items():
        high = config.workers if model.max_workers is None else model.max_workers
        if model.min_workers > high:
            raise ConfigError(
                "models", f"{name}: min-workers {model.min_workers} is over its max-workers {high}"
            )
        if high > config.workers:
            raise ConfigError(
                "models", f"{name}: max-workers {high} is over --workers {config.workers}"
            )
        bounds[name] = (model.min_workers, high)
    if (floor := sum(low for low, _ in bounds.values())) > config.workers:
        raise ConfigError(
            "models",
            f"need {floor} slots at least (their min-workers), over --workers {config.workers}",
        )
    shares = first_shares(config.workers, bounds)
    return {name: dataclasses.replace(model, workers=shares[name]) for name, model in built.items()}


def _config_of(config: Any, name: str, table: Mapping[str, Any], per_model: set[str]) -> Any:
    """The top-level `config` with the options of model `name`'s table."""
    for key in table:
        if key == "workers":
            why = "--workers is the budget of every model: a model's share is its"
            raise ConfigError("models", f"{name}: {why} min-workers and max-workers")
        if key not in per_model:
            close = difflib.get_close_matches(key, sorted(per_model), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError("models", f"{name}: {key} is no option a model's table takes{hint}")
    try:
        return dataclasses.replace(config, models={}, default_model=None, **table)
    except ConfigError as exc:
        raise ConfigError("models", f"{name}: {exc.field} {exc.problem}") from None


def first_shares(budget: int, bounds: Mapping[str, tuple[int, int]]) -> dict[str, int]:
    """How many slots each model starts with: its minimum, then one more to each model in
    turn (in the order declared) while it is under its maximum and slots are left."""
    shares = {model: low for model, (low, _) in bounds.items()}
    left = budget - sum(shares.values())
    while left > 0:
        grew = False
        for model, (_, high) in bounds.items():
            if left and shares[model] < high:
                shares[model] += 1
                left -= 1
                grew = True
        if not grew:
            break
    return shares


# Part of the one table of options (pool_options.py puts them after --workers).
MODEL_TABLE_OPTIONS = [
    Option(
        "models",
        model_entry,
        None,
        "a model served by name, as NAME=COMMAND (v3='python3 model3.py'), with the "
        "top-level options; repeat it for more. In the config file, a [models.NAME] "
        "table each, with any per-model option (the table marks them). --workers is "
        "then shared by all models, by demand; POST /models/NAME/predict asks one. "
        "Default: one model, named default",
        POOL,
        topic=MODELS,
        check=ModelTables(),
        factory=dict,
        flag_name="model",
        repeated=True,
    ),
    Option(
        "default_model",
        text_value,
        None,
        "the model POST /predict asks, with --model or [models.NAME] tables; default: "
        "the first declared",
        POOL,
        topic=MODELS,
        check=OrNone(not_blank("must name a model")),
    ),
    Option(
        "min_workers",
        integer,
        1,
        "with several models: slots a model keeps whatever the demand (0: it may have "
        "none until it is asked); the minimums add up to at most --workers",
        POOL,
        topic=MODELS,
        check=Range(0, maximum=MAX_WORKERS, integer=True),
        per_model=True,
    ),
    Option(
        "max_workers",
        integer,
        None,
        "with several models: slots a model may take from the others by demand, at "
        "most; default: --workers",
        POOL,
        topic=MODELS,
        check=OrNone(Range(1, maximum=MAX_WORKERS, integer=True)),
        per_model=True,
    ),
]
