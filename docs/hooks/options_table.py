"""Renders the configuration reference from modelpool's one definition of its options.

A page that holds the line `<!-- options-table -->` gets, in its place, a table of every
option in `modelpool.options.OPTIONS`: flag, variable, config-file key, default, which
commands take it, and its help text. So the reference cannot drift from `--help`.
"""

from __future__ import annotations

from typing import Any

from modelpool.options import OPTIONS

MARKER = "<!-- options-table -->"


def on_page_markdown(markdown: str, **_: Any) -> str:
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, render())


def render() -> str:
    rows = [
        "| option | variable | config key | default | commands | what it does |",
        "|---|---|---|---|---|---|",
    ]
    for option in OPTIONS:
        commands = "serve, worker" if option.for_worker else "serve"
        rows.append(
            f"| `{option.flag}` | `{option.env}` | `{option.dest}` | {default(option)} "
            f"| {commands} | {cell(option.help)} |"
        )
    return "\n".join(rows)


def default(option: Any) -> str:
    if option.convert is None:
        return "off"
    if option.default is None:
        return "unset"
    if isinstance(option.default, float) and option.default.is_integer():
        return f"`{int(option.default)}`"
    return f"`{option.default}`"


def cell(text: str) -> str:
    """Help text as one table cell: argparse's %% escape undone, pipes escaped."""
    return text.replace("%%", "%").replace("|", "\\|")
