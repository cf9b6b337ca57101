"""The one table of options agrees with everything made from it.

Every field of PoolConfig and ServerConfig is exactly one option; the defaults the
config classes give, the command line gives with nothing set, `--help` shows and the
configuration reference shows are the same values; and the reference lists every option
with its flag, variable, config-file key and commands, and nothing else.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from modelpool import PoolConfig, ServerConfig
from modelpool.cli.parser import build_parser, parse
from modelpool.settings.option import COMMAND, POOL, SERVER, Option
from modelpool.settings.options import BY_NAME, OPTIONS, TOPICS
from modelpool.settings.pool_options import LIBRARY_SETTINGS

ROOT = Path(__file__).resolve().parents[1]
HOOK = ROOT / "docs" / "hooks" / "options_table.py"


def hook() -> ModuleType:
    """The docs' hook, loaded from its file as mkdocs loads it."""
    spec = importlib.util.spec_from_file_location("options_table", HOOK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rows() -> dict[str, list[str]]:
    """The reference's table rows, by the flag in their first cell."""
    found: dict[str, list[str]] = {}
    for line in hook().render().splitlines():
        cells = [cell.strip() for cell in line.strip("|").split(" | ")]
        if line.startswith("| `--"):
            flag = cells[0].strip("`")
            assert flag not in found, f"{flag} listed twice"
            found[flag] = cells
    return found


def library_default(option: Option) -> Any:
    """What the library gives for `option` when it is not set (a command's own option:
    what the command line gives with nothing set)."""
    if option.owner == POOL:
        return getattr(PoolConfig(), option.name)
    if option.owner == SERVER:
        return getattr(ServerConfig(), option.name)
    _, settings = parse(["serve"], {})
    return getattr(settings, option.name)


def test_every_field_of_the_config_classes_is_exactly_one_option() -> None:
    names = Counter(option.name for option in [*OPTIONS, *LIBRARY_SETTINGS])
    assert [name for name, count in names.items() if count > 1] == []
    for cls, owner in ((PoolConfig, POOL), (ServerConfig, SERVER)):
        fields = [each for each in dataclasses.fields(cls) if each.name != "pool"]
        assert sorted(each.name for each in fields) == sorted(
            name for name, option in BY_NAME.items() if option.owner == owner
        )
        for each in fields:
            assert each.metadata["option"] is BY_NAME[each.name], each.name
    assert {option.owner for option in BY_NAME.values()} == {POOL, SERVER, COMMAND}
    assert all(option.topic in TOPICS for option in OPTIONS)
    assert all(option.commands == () for option in LIBRARY_SETTINGS)


@pytest.mark.parametrize("option", [*OPTIONS, *LIBRARY_SETTINGS], ids=lambda o: o.name)
def test_the_library_and_the_bare_command_give_the_tables_default(option: Option) -> None:
    expected = option.factory() if option.factory is not None else option.default
    assert library_default(option) == expected
    _, settings = parse(["serve"], {})
    config = settings.config
    given = {POOL: config.pool, SERVER: config, COMMAND: settings}[option.owner]
    if option.commands:
        assert getattr(given, option.name) == expected


def test_help_shows_each_default_the_library_gives() -> None:
    text = " ".join(build_parser().commands["serve"].format_help().split())
    for option in OPTIONS:
        value = library_default(option)
        shown = "" if option.default is None else f"; default {value}"
        assert f"(env {option.env}{shown})" in text, option.flag


def test_the_reference_lists_every_option_with_the_default_the_library_gives() -> None:
    assert "<!-- options-table -->" in (ROOT / "docs" / "configuration.md").read_text()
    found = rows()
    assert sorted(found) == sorted(option.flag for option in OPTIONS)  # no more, no fewer
    for option in OPTIONS:
        _, env, key, default, commands, about = found[option.flag]
        assert (env, key) == (f"`{option.env}`", f"`{option.key}`"), option.flag
        assert commands == ", ".join(option.commands), option.flag
        shown = about.replace("\\|", "|").replace("&lt;", "<")
        assert shown == option.help.replace("%%", "%"), option.flag
        value = library_default(option)
        if option.convert is None:
            assert (default, value) == ("on" if value else "off", option.default), option.flag
        elif option.default is None:
            assert default == "unset", option.flag  # the help text says what it does then
        elif isinstance(value, int | float):
            assert float(default.strip("`")) == value, option.flag
        else:
            assert default == f"`{value}`", option.flag


def test_the_reference_is_grouped_by_the_topics_of_help() -> None:
    text = hook().render()
    headings = [line[4:] for line in text.splitlines() if line.startswith("### ")]
    assert headings == [topic[0].upper() + topic[1:] for topic in TOPICS]
    for option in OPTIONS:
        section = text.split(f"### {option.topic[0].upper()}{option.topic[1:]}\n")[1]
        assert f"| `{option.flag}` |" in section.split("\n### ")[0], option.flag
