"""The package's import graph runs one way: ops -> model and training -> applications, with no
cycle, counting the imports inside functions too (a lazy import is still a dependency)."""

from __future__ import annotations

import ast
from pathlib import Path

import fastbert_kernels

PACKAGE_DIR = Path(fastbert_kernels.__file__).parent
PACKAGE = "fastbert_kernels"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE_DIR.rglob("*.py")}


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str) -> set[str]:
    """The package modules ``module`` imports, anywhere in its body."""
    path = MODULES[module]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(module, path.name == "__init__.py", node)
            # `from package import module` depends on the module; `from module import name` on it.
            targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in MODULES else source for a in node.names]
            targets = [f"{source}.{a.name}" for a in node.names if a.name == "_C"] or targets
        else:
            continue
        found |= {t for t in targets if t in MODULES and t != module}
    return found


GRAPH = {module: _imports(module) for module in MODULES}


def _rank(module: str) -> int:
    if module == f"{PACKAGE}.ops" or module.startswith(f"{PACKAGE}.ops."):
        return 0
    if module.startswith(f"{PACKAGE}.apps") or module == f"{PACKAGE}.__main__":
        return 2
    return 1


def test_imports_only_go_down():
    upward = [
        f"{module} imports {target}"
        for module, targets in GRAPH.items()
        for target in targets
        if _rank(target) > _rank(module)
    ]
    assert not upward, upward


def test_no_import_cycles():
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(GRAPH[module]):
            if state.get(target) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path[path.index(target) :], target]))
            if target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)


def test_the_library_holds_no_application_code():
    library = [m for m in MODULES if _rank(m) == 1 and m != PACKAGE]
    assert library, "no library modules found"
    for module in library:
        for target in GRAPH[module]:
            assert not target.startswith(f"{PACKAGE}.apps"), f"{module} imports the application module {target}"
