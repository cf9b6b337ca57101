"""A Griffe extension: the library reference's PoolConfig and ServerConfig fields, each with
its type, default and help from modelpool's one definition of its options.

settings/config.py declares each field as `workers: int = setting("workers")`: its default
and its meaning live in the option table (settings/options.py, settings/pool_options.py),
as the flag's do. Read as source, that line says only `setting('workers')`. This replaces
such a value by the option's default as Python writes it (`4`), and gives the field a
docstring made of the option's help and the names it goes by on the command line, in the
environment and in a config file. mkdocstrings loads it (`extensions:` in mkdocs.yml), and
`field_docstring()` is what the reference shows, so a test can read it without a build.
"""

from __future__ import annotations

import ast
from typing import Any

import griffe

from modelpool.settings.option import LIBRARY, Option
from modelpool.settings.options import BY_NAME

SETTING = "setting"  # the function config.py makes a field of an option with


class OptionFields(griffe.Extension):
    """Fields declared `name: type = setting("name")` get the option's default and help."""

    def on_attribute_instance(self, *, attr: griffe.Attribute, **_: Any) -> None:
        known = option_of(attr.value)
        if known is None:
            return
        # No default to show when it is made per config (the help says what it is).
        attr.value = None if known.factory is not None else repr(known.default)
        attr.docstring = griffe.Docstring(field_docstring(known), parent=attr)


def option_of(value: str | griffe.Expr | None) -> Option | None:
    """The option of a field whose value is `setting("name")`, else None."""
    if not isinstance(value, griffe.ExprCall) or str(value.function) != SETTING:
        return None
    if len(value.arguments) != 1 or not isinstance(value.arguments[0], str):
        return None
    try:
        name = ast.literal_eval(value.arguments[0])
    except (ValueError, SyntaxError):
        return None
    return BY_NAME.get(name) if isinstance(name, str) else None


def field_docstring(option: Option) -> str:
    """What the reference says of the field of `option`: its help, then where else it is
    set (or that only the library sets it)."""
    about = markdown_text(option.help) + "."
    if option.topic == LIBRARY:
        return f"{about}\n\nA setting of the library only: no flag, variable or config-file key."
    return (
        f"{about}\n\nThe option `{option.flag}`: variable `{option.env}`, config-file key "
        f"`{option.key}` ([every option](configuration.md#every-option))."
    )


def markdown_text(help_text: str) -> str:
    """An option's help as Markdown shows it: argparse's %% escape undone, and `<` escaped
    (`GPU-<uuid>` is text, not an HTML tag)."""
    return help_text.replace("%%", "%").replace("<", "&lt;")
