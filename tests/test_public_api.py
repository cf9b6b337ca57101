"""The library's public API: the names `modelpool` exports, where they are documented, and
what importing the package costs.

An embedder writes `from modelpool import Pool, PoolConfig, open_pool`; a name that goes
missing from `__all__`, stops resolving, or is exported without a word in
docs/embedding.md breaks them, or leaves them guessing. And `import modelpool` is free on
purpose (its names are imported when first used): `modelpool serve` starts its models
before it imports the HTTP stack, and an embedder of the pool never pays for it.
"""

from __future__ import annotations

import importlib.resources
import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import modelpool

EMBEDDING = Path(__file__).resolve().parent.parent / "docs" / "embedding.md"

# What docs/embedding.md documents; a change here is a change of the library's API.
DOCUMENTED = {
    "BadRequest",
    "ConfigError",
    "DeadlineExceeded",
    "DeadlineUnmet",
    "FirstStartFailed",
    "Fleet",
    "Health",
    "ModelCommandError",
    "ModelFailed",
    "ModelTimeout",
    "Pool",
    "PoolConfig",
    "PoolError",
    "PoolMetrics",
    "QueueFull",
    "QueueTimeout",
    "QueueUnavailable",
    "Reaper",
    "ServerConfig",
    "ShuttingDown",
    "Timing",
    "UnknownModel",
    "open_fleet",
    "open_pool",
}

# What an embedder calls on a Pool: its public methods and properties, each rendered in
# docs/embedding.md from its docstring. Everything else of it is private by name.
POOL_SURFACE = {
    "predict",
    "wait_ready",
    "wait_changed",
    "status",
    "health",
    "shutdown",
    "kill",
    "ready_count",
    "queue_length",
    "local_ready",
    "generation",
    "model_config",
    "node_status",
    "serves_http",
    "mark_serving_http",
}

# Serving HTTP, and the libraries only some embedders use (a request schema, JSON logs).
HTTP_STACK = {"quart", "quart_trio", "hypercorn", "werkzeug", "h11", "h2"}
ON_DEMAND = {"jsonschema", "pythonjsonlogger", "coredis"}


def imported_by(statement: str) -> list[str]:
    """The modules a fresh interpreter imports to run `statement`, beyond its start-up."""
    probe = (
        "import json, sys\n"
        "before = set(sys.modules)\n"
        f"{statement}\n"
        "print(json.dumps(sorted(set(sys.modules) - before)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    modules: list[str] = json.loads(done.stdout)
    return modules


def test_all_is_the_documented_set() -> None:
    assert len(modelpool.__all__) == len(set(modelpool.__all__)), "a name is listed twice"
    assert set(modelpool.__all__) == DOCUMENTED


def test_every_exported_name_resolves_to_what_it_names() -> None:
    for name in modelpool.__all__:
        value = getattr(modelpool, name)
        assert value.__name__ == name
        assert value.__module__.startswith("modelpool."), (name, value.__module__)


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="NoSuchThing"):
        _ = modelpool.NoSuchThing


def test_every_exported_name_is_in_the_embedding_guide() -> None:
    page = EMBEDDING.read_text(encoding="utf-8")
    rendered = set(re.findall(r"^::: modelpool\.(\w+)\s*$", page, flags=re.MULTILINE))
    missing = [
        name
        for name in modelpool.__all__
        if name not in rendered and f"`{name}`" not in page and f"modelpool.{name}" not in page
    ]
    assert not missing, f"docs/embedding.md says nothing of {missing}"
    assert rendered <= set(modelpool.__all__), (
        f"docs/embedding.md renders names the package does not export: "
        f"{sorted(rendered - set(modelpool.__all__))}"
    )


def test_a_pools_public_members_are_its_documented_surface() -> None:
    """A method the pool's own modules need is private by name: it is not published, and an
    embedder does not come to depend on it. docs/embedding.md renders `Pool` with its
    public members, so each needs a docstring, and no list there may hide one."""
    from modelpool.pool.pool import Pool

    public = {name for name in vars(Pool) if not name.startswith("_")}
    assert public == POOL_SURFACE, (
        f"published but not meant to be: {sorted(public - POOL_SURFACE)}; "
        f"meant to be but missing: {sorted(POOL_SURFACE - public)}"
    )
    undocumented = [name for name in public if not inspect.getdoc(getattr(Pool, name))]
    assert not undocumented, f"docs/embedding.md would not show {undocumented}"
    page = EMBEDDING.read_text(encoding="utf-8")
    block = page.split("::: modelpool.Pool\n", 1)[1].split(":::", 1)[0]
    assert "members:" not in block, "docs/embedding.md picks Pool's members by hand"


def test_importing_the_package_imports_only_the_standard_library() -> None:
    """What it costs today, pinned: the package's own `__init__` and a few stdlib modules;
    no other modelpool module, no trio, no HTTP stack."""
    imported = imported_by("import modelpool")
    assert "modelpool" in imported
    beyond = [
        name
        for name in imported
        if name != "modelpool" and name.split(".")[0] not in sys.stdlib_module_names
    ]
    assert not beyond, f"import modelpool imports {beyond}"


def test_an_embedder_of_the_pool_does_not_import_the_http_stack() -> None:
    imported = imported_by("from modelpool import Pool, PoolConfig, open_pool")
    assert "modelpool.pool.pool" in imported
    tops = {name.split(".")[0] for name in imported}
    assert not tops & HTTP_STACK, sorted(tops & HTTP_STACK)
    assert not tops & ON_DEMAND, sorted(tops & ON_DEMAND)
    above_the_pool = ("modelpool.http", "modelpool.service", "modelpool.cli")
    ours = [name for name in imported if name.startswith(above_the_pool)]
    assert not ours, ours


def test_the_package_says_it_is_typed() -> None:
    """PEP 561: without py.typed, mypy ignores the hints of an installed modelpool."""
    assert (importlib.resources.files("modelpool") / "py.typed").is_file()
