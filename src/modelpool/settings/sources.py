"""Where options come from besides the command line: MODELPOOL_* variables and a config file.

Each option is taken from its flag, else its variable, else the config file; one given
nowhere is left out, so the config class gives it the table's default. Every value is
read by the option's own parser (parsers.py), as a flag's is; a mistake names the option
and where its value came from (the variable with its value, unless the option is a
secret; or the file), so the command line can say so.
"""

from __future__ import annotations

import difflib
import os
import stat
import tomllib
from collections.abc import Iterable, Mapping
from typing import Any

from modelpool.settings.checks import MiB
from modelpool.settings.option import Option
from modelpool.settings.options import OPTIONS
from modelpool.settings.parsers import BadValue

TRUE_WORDS = {"1", "true", "yes", "on"}
FALSE_WORDS = {"0", "false", "no", "off", ""}
MAX_CONFIG_FILE = 1 * MiB  # a file of options is a few lines


class OptionValueError(ValueError):
    """A value its option refuses; `option` is which, `where` says whence ("from FILE")."""

    def __init__(self, option: Option, where: str, problem: str) -> None:
        super().__init__(problem)
        self.option = option
        self.where = where


def choose(
    options: Iterable[Option],
    flags: Mapping[str, Any],
    environ: Mapping[str, str],
    from_file: Mapping[str, Any],
    config_file: str | None,
) -> tuple[dict[str, Any], dict[str, str]]:
    """The value of each option given anywhere, by name, and whence each that did not
    come from its flag came ("from MODELPOOL_X='v'", "from FILE").

    `flags` holds the values given on the command line; `from_file` those of the config
    file (see read_config_file). Raises OptionValueError for a variable its option refuses.
    """
    values: dict[str, Any] = {}
    source: dict[str, str] = {}
    for option in options:
        if option.name in flags:
            values[option.name] = flags[option.name]
        elif option.env in environ:
            values[option.name], source[option.name] = from_environ(option, environ[option.env])
        elif option.name in from_file:
            values[option.name] = from_file[option.name]
            source[option.name] = f"from {config_file}"
    return values, source


def from_environ(option: Option, raw: str) -> tuple[Any, str]:
    """The value of `option` from its variable's text, and whence it came, for messages:
    the variable with its value, but never a secret's, nor a queue URL's password."""
    where = "from " + (option.env if option.secret else f"{option.env}={option.shown(raw)!r}")
    try:
        return (option.convert or switch)(raw), where
    except BadValue as exc:
        raise OptionValueError(option, where, str(exc)) from None


def switch(raw: str) -> bool:
    """An on/off switch from a variable: 1/0, true/false, yes/no, on/off (or empty: off)."""
    word = raw.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise BadValue("must be one of 1/0, true/false, yes/no, on/off")


def read_config_file(path: str) -> dict[str, Any]:
    """Options from a TOML file, by name: `max-queue = 64` (or `max_queue`) sets --max-queue.

    A string is read as on the command line; a number or a boolean as itself, and a
    list of strings as a command (`model-cmd = ["python3", "-u", "model.py"]`).
    A regular file or a pipe (`--config <(...)`) of at most MAX_CONFIG_FILE bytes.
    Raises OptionValueError for a value its option refuses, ValueError for the rest.
    """
    try:
        with open(path, "rb") as file:
            kind = os.fstat(file.fileno()).st_mode
            if not (stat.S_ISREG(kind) or stat.S_ISFIFO(kind)):
                raise ValueError("not a file (a device, a directory or a socket)")
            data = file.read(MAX_CONFIG_FILE + 1)  # no further: /dev/zero would never end
    except OSError as exc:
        raise ValueError(exc.strerror or str(exc)) from None
    if len(data) > MAX_CONFIG_FILE:
        raise ValueError(f"larger than {MAX_CONFIG_FILE // MiB} MiB: not a file of options")
    try:
        table = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 text (byte {exc.start + 1} is not)") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"not valid TOML: {exc}") from None
    by_key = {option.key: option for option in OPTIONS}
    values: dict[str, Any] = {}
    for key, raw in table.items():
        name = key.replace("-", "_")
        option = by_key.get(name)
        if option is None:
            close = difflib.get_close_matches(name, list(by_key), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0].replace('_', '-')}?)" if close else ""
            raise ValueError(f"{key}: no such option{hint}")
        try:
            if name == "models" and isinstance(raw, dict):
                values[name] = {model: model_table(model, table) for model, table in raw.items()}
            else:
                values[name] = from_toml(option, raw)
        except BadValue as exc:
            raise OptionValueError(option, f"from {path}", str(exc)) from None
    return values


def model_table(model: str, table: Any) -> dict[str, Any]:
    """The options of one `[models.NAME]` table, each read as at the top level; only the
    options marked per model may be set in one."""
    if not isinstance(table, dict):
        raise BadValue(f"{model}: must be a table ([models.{model}]), got {table!r}")
    per_model = {option.key: option for option in OPTIONS if option.per_model and option.commands}
    values: dict[str, Any] = {}
    for key, raw in table.items():
        name = key.replace("-", "_")
        option = per_model.get(name)
        if option is None:
            if name == "workers":
                why = "--workers is the budget of every model: a model's share is its "
                raise BadValue(f"{model}: {why}min-workers and max-workers")
            close = difflib.get_close_matches(name, list(per_model), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0].replace('_', '-')}?)" if close else ""
            raise BadValue(f"{model}: {key} is no option a model's table takes{hint}")
        try:
            values[name] = from_toml(option, raw)
        except BadValue as exc:
            raise BadValue(f"{model}: {key} {exc}") from None
    return values


def from_toml(option: Option, raw: Any) -> Any:
    """The value of `option` from a config file's value: a switch takes a boolean, an
    option that takes lists a list, and every option a string or a number as its text."""
    if option.convert is None:
        if not isinstance(raw, bool):
            raise BadValue(f"must be true or false, got {raw!r}")
        return raw
    if option.lists is not None and isinstance(raw, list):
        return option.lists(raw)
    if isinstance(raw, bool) or not isinstance(raw, str | int | float):
        raise BadValue(f"must be a string or a number, got {raw!r}")
    return option.convert(str(raw))
