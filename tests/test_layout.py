"""What ARCHITECTURE.md says of the code's layout that import-linter cannot see.

import-linter follows imports; a module that finds another package's file by its path
(`Path(__file__).parents[1] / "process" / ...`) is a link between layers that no
contract sees, so it is refused here. And ARCHITECTURE.md says that only the launcher,
a standalone program, passes 400 lines: a module past that has grown a second concern.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "modelpool"
MAX_LINES = 400
LONG_ON_PURPOSE = {"process/_launcher.py"}  # it runs by path, so it cannot import a sibling


def modules() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def test_only_the_launcher_passes_the_line_limit() -> None:
    long = {
        str(path.relative_to(SRC)): lines
        for path in modules()
        if (lines := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert set(long) == LONG_ON_PURPOSE, f"modules over {MAX_LINES} lines: {long}"


def _levels_up(node: ast.expr) -> int | None:
    """How many directories above its own file `node` climbs, when it is
    `Path(__file__).parent...` or `Path(__file__)(.resolve()).parents[N]`; else None."""
    levels = 0
    while True:
        if isinstance(node, ast.Attribute) and node.attr == "parent":
            levels, node = levels + 1, node.value
        elif (
            isinstance(node, ast.Subscript)
            and isinstance(node.value, ast.Attribute)
            and node.value.attr == "parents"
            and isinstance(node.slice, ast.Constant)
            and isinstance(node.slice.value, int)
        ):
            levels, node = levels + node.slice.value + 1, node.value.value
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            node = node.func.value  # .resolve(), .absolute()
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            args = node.args
            is_file = len(args) == 1 and isinstance(args[0], ast.Name) and args[0].id == "__file__"
            return levels if node.func.id == "Path" and is_file else None
        else:
            return None


def test_no_module_reaches_another_package_by_path() -> None:
    """A path built from `__file__` stays in the module's own package, or leaves
    modelpool altogether (a source checkout's files at the repository's root)."""
    reaching = []
    for path in modules():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.expr) or (levels := _levels_up(node)) is None:
                continue
            directory = path.parents[levels - 1] if levels else path
            inside = directory == SRC or SRC in directory.parents
            if inside and directory != path.parent and path.parent not in directory.parents:
                reaching.append(f"{path.relative_to(SRC)}:{node.lineno}")
    assert not reaching, f"modules that find another package's files by path: {reaching}"
