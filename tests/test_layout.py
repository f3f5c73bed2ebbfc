"""The package's shape, as the README's Layout section promises it: no import circles, nothing
below a command imports a command, and console.py and checkpoint.py know nothing of each other.
Every import counts, also those inside functions (they are circles that only wait for a caller)."""

from __future__ import annotations

import ast

from conftest import REPO

PACKAGE = REPO / "trainer"
COMMANDS = {"cli", "evaluate", "predict", "plot", "__main__"}


def imports() -> dict[str, set[str]]:
    """trainer module -> the trainer modules it imports (anywhere in its source)."""
    names = {p.stem for p in PACKAGE.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("trainer"):
                parts = node.module.split(".")
                if len(parts) > 1:
                    found.add(parts[1])
                else:  # from trainer import checkpoint, runtime
                    found |= {a.name for a in node.names if a.name in names}
            elif isinstance(node, ast.Import):
                found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("trainer.")}
        graph[path.stem] = found - {path.stem, "__init__"}
    return graph


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_module_imports_a_module_that_imports_it_back():
    graph = imports()
    assert graph["engine"] >= {"state", "runtime", "runlog", "checkpoint", "data", "evaluation"}  # the parse works
    assert cycle(graph) is None, " -> ".join(cycle(graph))
    # Negative control: the circle the engine's split removed (cli -> engine -> evaluate -> cli).
    assert cycle({**graph, "engine": graph["engine"] | {"evaluate"}, "evaluate": graph["evaluate"] | {"cli"}})


def test_nothing_below_a_command_imports_a_command():
    graph = imports()
    for module, imported in graph.items():
        if module != "__main__":
            assert not (imported & COMMANDS), f"{module} imports {sorted(imported & COMMANDS)}"
    assert "checkpoint" not in graph["console"] and "console" not in graph["checkpoint"]
