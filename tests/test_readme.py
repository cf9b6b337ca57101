"""The README, the project's front page: its links into docs/ lead to a page and a heading,
and its promise about bad input says what holds without a request schema (the service
checks that the body is JSON; what the JSON holds is the model's to check) and what
`--request-schema` adds, with a link to where that is explained.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

from modelpool.settings.options import option

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
DOCS_LINK = re.compile(r"\]\((docs/[^)#\s]+)(?:#([^)\s]+))?\)")
HEADING = re.compile(r"^#{1,6} (.*?)(?: \{#([\w-]+)\})?$", re.MULTILINE)


def slug(title: str) -> str:
    """A heading's anchor as mkdocs makes it (Python-Markdown's toc `slugify`)."""
    text = unicodedata.normalize("NFKD", title).encode("ascii", "ignore").decode()
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(page: Path) -> set[str]:
    """The anchors of a page's headings: an explicit `{#id}`, else the title's slug."""
    text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.M | re.S)
    return {given or slug(title) for title, given in HEADING.findall(text)}


def promises() -> list[str]:
    """The numbered items of "What it promises", each on one line."""
    section = README.split("\n## What it promises\n", 1)[1].split("\n## ", 1)[0]
    items = re.split(r"^\d+\. ", section, flags=re.MULTILINE)[1:]
    return [" ".join(item.split()) for item in items]


def test_every_link_into_the_docs_leads_to_a_page_and_a_heading() -> None:
    links = DOCS_LINK.findall(README)
    assert len(links) >= 10
    for target, anchor in links:
        path = ROOT / target
        assert path.exists(), target
        if anchor:
            assert anchor in anchors(path), f"{target} has no heading #{anchor}"


def test_the_promise_about_bad_input_says_what_the_request_schema_adds() -> None:
    """It once said bad input "never reaches a model", which holds for a body that is not
    JSON, but for JSON the model cannot use only with `--request-schema`, which the README
    never named."""
    (promise,) = [item for item in promises() if item.startswith("**Bad input")]
    flag = option("request_schema").flag
    assert f"`{flag}`" in promise, promise
    assert "(docs/configuration.md#validating-requests-request-schema)" in promise, promise
    assert "not JSON" in promise and "never reach" in promise, promise
