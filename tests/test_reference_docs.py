"""The library reference (docs/embedding.md) as the built site shows it.

config.py declares each field of PoolConfig and ServerConfig as `name: type =
setting("name")`, and the option table holds its default and help. The reference once
showed `workers = setting('workers')` for every field; it must show each field's type,
its default (as Python writes it) and its help, made from the table at build time
(docs/hooks/option_fields.py), so it cannot drift from `--help`. The site is built here
as `nox -s docs` builds it (strict: a warning fails), into a temporary directory.
"""

from __future__ import annotations

import dataclasses
import html
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from modelpool import PoolConfig, ServerConfig
from modelpool.settings.option import Option

ROOT = Path(__file__).resolve().parents[1]
BLOCK_TAG = re.compile(r"</?(?:p|div|li|ul|ol|h\d|br|table|tr|td|th)\b[^>]*>")
TAG = re.compile(r"<[^>]+>")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-d", str(out)],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def text_of(markup: str) -> str:
    """What a reader sees of some HTML: blocks apart, inline tags dropped, entities read,
    spaces collapsed."""
    return " ".join(html.unescape(TAG.sub("", BLOCK_TAG.sub(" ", markup))).split())


def attributes(page: str, owner: str) -> dict[str, tuple[str, str]]:
    """The reference's entries for the fields of `owner` (`modelpool.PoolConfig`): by
    name, the text of its heading and of its description."""
    found = {}
    for entry in page.split('<div class="doc doc-object doc-attribute">')[1:]:
        heading = re.search(rf'<h\d id="{re.escape(owner)}\.(\w+)"[^>]*>(.*?)</h\d>', entry, re.S)
        if heading:
            heading_text = text_of(heading.group(2)).removesuffix("¶").strip()
            found[heading.group(1)] = (heading_text, text_of(entry[heading.end() :]))
    return found


@pytest.mark.parametrize("config", [PoolConfig, ServerConfig], ids=lambda cls: cls.__name__)
def test_each_field_shows_its_type_default_and_help(site: Path, config: type) -> None:
    page = (site / "embedding" / "index.html").read_text(encoding="utf-8")
    entries = attributes(page, f"modelpool.{config.__name__}")
    fields = [each for each in dataclasses.fields(config) if "option" in each.metadata]
    assert fields
    for each in fields:
        option: Option = each.metadata["option"]
        assert each.name in entries, f"{config.__name__}.{each.name} is not in the reference"
        heading, about = entries[each.name]
        declared = f"{each.name}: {each.type}"  # as config.py writes its type
        if option.factory is None:
            assert heading == f"{declared} = {option.default!r}", heading
        else:  # made per config: the help says what it is
            assert heading == declared, heading
        assert " ".join(option.help.replace("%%", "%").split()) in about, (each.name, about)
        if option.commands:
            assert f"The option {option.flag}: variable {option.env}" in about, about
        else:
            assert "A setting of the library only" in about, about
    assert "setting(" not in text_of(page)


def test_the_pool_field_of_server_config_says_what_it_is(site: Path) -> None:
    page = (site / "embedding" / "index.html").read_text(encoding="utf-8")
    heading, about = attributes(page, "modelpool.ServerConfig")["pool"]
    assert heading.startswith("pool: PoolConfig")
    assert "The pool behind it" in about


def test_help_that_holds_angle_brackets_shows_them(site: Path) -> None:
    """`GPU-<uuid>` in --devices' help is text, not an HTML tag a browser hides."""
    for page in ("embedding", "configuration"):
        text = (site / page / "index.html").read_text(encoding="utf-8")
        assert "GPU-&lt;uuid&gt;" in text, page
