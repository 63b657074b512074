"""fastft's imports point one way, down the layers below, and close no cycle: every import of every module is read,
those inside functions included (a function-level import that closes a cycle only hides it)."""
import ast
import sys
from collections import defaultdict
from pathlib import Path

import fastft

PACKAGE = Path(fastft.__file__).resolve().parent

# Lowest first: a module imports from its own layer or one below. A name stands for the module and, for a package,
# everything in it.
LAYERS = [
    ("the ground floor", {"fastft.errors", "fastft.atomic", "fastft.run_folder", "fastft.fastai_internals",
                          "fastft.version", "fastft.values"}),
    ("the declarations", {"fastft.schedules", "fastft.recipe"}),
    ("data", {"fastft.data"}),
    ("deploy", {"fastft.deploy"}),
    ("train", {"fastft.train"}),
    ("the command line and the public API", {"fastft.cli", "fastft.__main__", "fastft"}),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> dict[str, int]:
    """The fastft modules `name` imports, anywhere in it, with the line of the first import of each."""
    found = {}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            # `from fastft.train import checkpoint` imports the module fastft.train.checkpoint
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import a.b.c` names the module a.b.c, or what holds it
                target = target.rpartition(".")[0]
            if target and target != name:
                found.setdefault(target, node.lineno)
    return found


def layer_of(name: str) -> int:
    for index, (_, members) in enumerate(LAYERS):
        if any(name == m or (name.startswith(m + ".") and m != "fastft") for m in members):
            return index
    raise AssertionError(f"{name} is in no layer: add it to LAYERS in {__file__}")


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in list(graph):
        if v not in index:
            visit(v)
    return found


def import_graph() -> tuple[dict[str, set[str]], dict[tuple[str, str], int]]:
    found = modules()
    graph, lines = defaultdict(set), {}
    for name, path in found.items():
        graph[name]
        for target, line in imports_of(name, path, set(found)).items():
            graph[name].add(target)
            lines[name, target] = line
    return graph, lines


def test_every_import_points_down_the_layers():
    graph, lines = import_graph()
    upward = [f"{name}:{lines[name, target]} imports {target} ({LAYERS[layer_of(target)][0]}, above "
              f"{LAYERS[layer_of(name)][0]})"
              for name in sorted(graph) for target in sorted(graph[name]) if layer_of(target) > layer_of(name)]
    assert not upward, "\n".join(upward)


def test_no_import_closes_a_cycle():
    graph, _ = import_graph()
    assert cycles(graph) == []


def test_the_check_sees_an_upward_import_and_a_cycle_hidden_in_a_function(tmp_path):
    # the walk reads imports inside functions too: the two faults this file guards against, made on purpose
    source = "def later():\n    from fastft.train.run import train\n"
    path = tmp_path / "fastft" / "data" / "sneaky.py"
    path.parent.mkdir(parents=True)
    path.write_text(source)
    found = imports_of("fastft.data.sneaky", path, {"fastft.train.run", "fastft.data.sneaky"})
    assert found == {"fastft.train.run": 2} and layer_of("fastft.train.run") > layer_of("fastft.data.sneaky")
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
