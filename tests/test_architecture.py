"""The package's shape, read from its source with `ast` (nothing is imported): layers that import only
downward, no import cycle, few imports inside functions (each saying why), and an ARCHITECTURE.md whose
paths exist."""
from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Iterator, Optional

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "spinal_transfer"
# low -> high; a module may import its own layer or a lower one
LAYERS = ("errors", "utils", "data", "config", "runs", "models", "evaluation", "training", "deploy", "experiments",
          "cli")
EXEMPT = {"spinal_transfer", "spinal_transfer.__main__"}     # the root package's lazy names and `python -m`
LAZY = re.compile(r"#\s*lazy:\s*\S")
MAX_LAZY_OUTSIDE_CLI = 5


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _targets(name: str, node: ast.AST) -> Iterator[str]:
    """The package modules an import statement in module `name` loads (a `from pkg import x` loads pkg.x when it
    is a module, else pkg)."""
    if isinstance(node, ast.Import):
        yield from (a.name for a in node.names if a.name in MODULES)
        return
    assert isinstance(node, ast.ImportFrom)
    if node.level:
        base = name.split(".") if _is_package(name) else name.split(".")[:-1]
        base = base[:len(base) - node.level + 1]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    if source not in MODULES:
        return
    subs = [f"{source}.{a.name}" for a in node.names if f"{source}.{a.name}" in MODULES]
    yield from subs
    if len(subs) < len(node.names):
        yield source


def _function_level(tree: ast.Module) -> set[ast.AST]:
    """Import nodes inside a function body (at any depth)."""
    inside: set[ast.AST] = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inside.update(n for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom)))
    return inside


def imports() -> list[tuple[str, str, int, bool]]:
    """(importer, imported, line, inside a function) for every import of a package module by a package module."""
    out = []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        lazy = _function_level(tree)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                out.extend((name, t, node.lineno, node in lazy) for t in _targets(name, node) if t != name)
    return out


def layer(name: str) -> Optional[str]:
    """The layer of a module: its first name under spinal_transfer (config.py and errors.py are layers)."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and name not in EXEMPT else None


def test_every_module_has_a_layer_and_every_folder_is_a_package():
    assert {layer(n) for n in MODULES} - {None} == set(LAYERS)
    folders = {p.parent for p in PACKAGE.rglob("*.py")}
    assert [str(f.relative_to(REPO)) for f in folders if not (f / "__init__.py").is_file()] == []


def test_no_import_goes_up_a_layer():
    up = [f"{a} -> {b} (line {line})" for a, b, line, _ in imports()
          if layer(a) and layer(b) and LAYERS.index(layer(b)) > LAYERS.index(layer(a))]
    assert up == []


def find_cycle(graph: dict[str, set[str]]) -> Optional[list[str]]:
    """One cycle of `graph` (depth-first), as [a, b, ..., a], or None."""
    state: dict[str, int] = {}              # 1: on the current path, 2: done
    path: list[str] = []

    def visit(n: str) -> Optional[list[str]]:
        state[n] = 1
        path.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return path[path.index(m):] + [m]
            if m not in state and (cycle := visit(m)):
                return cycle
        state[n] = 2
        path.pop()
        return None

    return next((c for n in sorted(graph) if n not in state and (c := visit(n))), None)


def test_the_checks_see_what_they_check():
    edges = {(a, b, inside) for a, b, _, inside in imports()}
    assert ("spinal_transfer.config", "spinal_transfer.errors", False) in edges          # from .errors import ...
    assert ("spinal_transfer.cli", "spinal_transfer", False) in edges                     # from .. import __version__
    assert ("spinal_transfer.cli.train", "spinal_transfer.training.train", True) in edges  # inside main()
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle():
    graph: dict[str, set[str]] = {n: set() for n in MODULES}
    for a, b, _, _ in imports():
        graph[a].add(b)
    assert find_cycle(graph) is None


def test_imports_inside_functions_are_few_and_say_why():
    lines = {n: p.read_text().splitlines() for n, p in MODULES.items()}
    lazy = sorted({(a, line) for a, _, line, inside in imports() if inside})
    unexplained = [f"{a}:{line}: {lines[a][line - 1].strip()}" for a, line in lazy
                   if not LAZY.search(lines[a][line - 1])]
    assert unexplained == [], "each import inside a function needs a `# lazy: <why>` comment on its line"
    outside_cli = [f"{a}:{line}" for a, line in lazy if layer(a) != "cli"]
    assert len(outside_cli) <= MAX_LAZY_OUTSIDE_CLI, outside_cli


def test_the_root_packages_lazy_names_exist():
    """`spinal_transfer.build_model` & co. are loaded on first use from the modules `_LAZY` names."""
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    lazy = next(ast.literal_eval(n.value) for n in tree.body
                if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "_LAZY")
    for attr, module in lazy.items():
        defined = {getattr(n, "name", None) for n in ast.parse(MODULES[f"spinal_transfer.{module}"].read_text()).body}
        assert attr in defined, (attr, module)


ARCHITECTURE = REPO / "ARCHITECTURE.md"
PATHLIKE = re.compile(r"`([\w./-]+(?:/|\.py|\.md|\.cfg|\.ya?ml))`")


def test_architecture_md_is_short_and_its_paths_exist():
    text = ARCHITECTURE.read_text()
    assert len(text.splitlines()) <= 60
    paths = PATHLIKE.findall(text)
    assert len(paths) >= 10
    assert [p for p in paths if not (REPO / p).exists()] == []


def test_long_functions_say_why():
    """No function over 60 lines without a `# long: <why>` comment right above it (training/ has none: its own
    test in tests/runs/test_runs.py keeps every function there under 60 lines)."""
    unexplained = []
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60:
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                if not lines[first - 2].strip().startswith("# long:"):
                    unexplained.append(f"{path.relative_to(PACKAGE)}:{node.name} ({node.end_lineno - node.lineno + 1})")
    assert unexplained == []
