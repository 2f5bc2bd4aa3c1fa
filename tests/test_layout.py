"""The package's layering, read from its source: commands on top, nothing imports them, no import cycles
(imports inside functions count)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "vfusion3d_lightning"
TOP = ("vfusion3d_lightning.commands", "vfusion3d_lightning.cli")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports anywhere in its body."""
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                for alias in node.names:  # `from package import module` imports the module
                    targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in paths else base)
            elif isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
        graph[name] = {t for t in targets if t in paths and t != name}
    return graph


def is_top(name: str) -> bool:
    return any(name == top or name.startswith(top + ".") for top in TOP)


def test_only_commands_and_the_cli_import_commands():
    wrong = sorted(f"{module} imports {target}" for module, targets in import_graph().items()
                   for target in targets if is_top(target) and not is_top(module))
    assert not wrong, wrong


def test_no_import_cycles():
    graph = import_graph()
    # a package's __init__ re-exporting its own modules is no cycle of layers
    edges = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in graph.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for target in sorted(edges[node]):
            if state.get(target) == 1:
                cycles.append(trail[trail.index(target):] + [target])
            elif target not in state:
                visit(target, [*trail, target])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph()
    # commands.pipeline imports the render command inside a stage function
    assert "vfusion3d_lightning.commands.render" in graph["vfusion3d_lightning.commands.pipeline"]
