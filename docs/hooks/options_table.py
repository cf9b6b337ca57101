"""Renders the configuration reference from modelpool's one definition of its options.

A page that holds the line `<!-- options-table -->` gets, in its place, a table of every
option in `modelpool.settings.options.OPTIONS`: flag, variable, config-file key, default, which
commands take it, and its help text; grouped by the topics of `--help` where the
options have them (`modelpool.settings.options.TOPICS`). So the reference cannot drift from
`--help`.
"""

from __future__ import annotations

from typing import Any

from modelpool.settings import options

MARKER = "<!-- options-table -->"
PER_MODEL_MARKER = "<!-- per-model-options -->"


def on_page_markdown(markdown: str, **_: Any) -> str:
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, render())
    if PER_MODEL_MARKER in markdown:
        markdown = markdown.replace(PER_MODEL_MARKER, per_model_list())
    return markdown


def render() -> str:
    topics: dict[str, str] = getattr(options, "TOPICS", {})
    if not topics:
        return table(options.OPTIONS)
    parts = []
    for name, about in topics.items():
        chosen = [option for option in options.OPTIONS if option.topic == name]
        parts.append(f"### {name[0].upper()}{name[1:]}\n\n{about[0].upper()}{about[1:]}.\n")
        parts.append(table(chosen) + "\n")
        if note := per_model_note(chosen):
            parts.append(note + "\n")
    left = [option for option in options.OPTIONS if option.topic not in topics]
    if left:
        parts.append("### Other\n\n" + table(left) + "\n")
    return "\n".join(parts)


def table(chosen: list[Any]) -> str:
    rows = [
        "| option | variable | config key | default | commands | what it does |",
        "|---|---|---|---|---|---|",
    ]
    for option in chosen:
        commands = ", ".join(option.commands)
        rows.append(
            f"| `{option.flag}` | `{option.env}` | `{option.key}` | {default(option)} "
            f"| {commands} | {cell(option.help)} |"
        )
    return "\n".join(rows)


def per_model(chosen: list[Any]) -> list[Any]:
    """The options of `chosen` a `[models.NAME]` table may set."""
    return [option for option in chosen if getattr(option, "per_model", False)]


def per_model_note(chosen: list[Any]) -> str:
    keys = ", ".join(f"`{option.key}`" for option in per_model(chosen))
    if not keys:
        return ""
    return f"Per model, in a `[models.NAME]` table ([several models](models.md)): {keys}."


def per_model_list() -> str:
    """Every option a `[models.NAME]` table may set, as its config key and its flag."""
    keys = [f"`{option.key}` (`{option.flag}`)" for option in per_model(options.OPTIONS)]
    return ", ".join(keys) + "."


def default(option: Any) -> str:
    if option.convert is None:
        return "on" if option.default else "off"
    if option.default is None:
        return "unset"
    if isinstance(option.default, float) and option.default.is_integer():
        return f"`{int(option.default)}`"
    return f"`{option.default}`"


def cell(text: str) -> str:
    """Help text as one table cell: argparse's %% escape undone, pipes escaped, and `<`
    too (`GPU-<uuid>` is text, not an HTML tag)."""
    return text.replace("%%", "%").replace("|", "\\|").replace("<", "&lt;")
