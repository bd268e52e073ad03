"""STYLE.md rule 1 for the whole package: every module imports only stages to its left, and no
modules import each other in a circle.

Stages, left to right (a module may import a package of a lower rank, or modules of its own
package; packages that share a rank are siblings and do not import each other):

    0 errors, native (shared helpers)   1 models   2 lora   3 quant, analysis   4 train
    5 adapters, demo   6 serve   7 api, bench   8 cli

Where the side packages sit follows from what they import: `analysis` reads adapters with
lora's PEFT reader (nothing from quant or later), `demo` runs the trainer, `bench` drives the
serving engine, the demo pipeline and the analyses; only the CLI calls them. The top-level
`lorafleet` package is a facade that imports its names on first use (`_API`); it sits at the
rank of the rightmost module it names.

Imports are read with `ast`, including those inside functions (a deferred import is still an
arrow, and a circle hidden behind one is still a circle).
"""
import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "src" / "lorafleet"
RANKS = {"errors": 0, "native": 0, "models": 1, "lora": 2, "quant": 3, "analysis": 3,
         "train": 4, "adapters": 5, "demo": 5, "serve": 6, "api": 7, "bench": 7, "cli": 8}


def package_modules() -> dict[str, Path]:
    """Dotted name -> file, for every module of the package (a package is its __init__.py)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that `name` imports, anywhere in its file. `from a import b` is an
    import of module `a.b` when that is a module, else of `a`."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:                       # relative: from .x import y, from . import y
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def facade_names(modules: dict[str, Path]) -> list[str]:
    """The modules the top-level package's `_API` table imports lazily (strings, not imports)."""
    tree = ast.parse(modules["lorafleet"].read_text())
    for node in tree.body:
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict)
                and any(isinstance(t, ast.Name) and t.id == "_API" for t in node.targets)):
            return [v.value for v in node.value.values if isinstance(v, ast.Constant)]
    return []


def rank(name: str, facade_rank: int) -> int | None:
    """The stage of module `name`: that of its top-level package below lorafleet."""
    if name == "lorafleet":
        return facade_rank
    return RANKS.get(name.split(".")[1])


def stage_of(name: str) -> str:
    return "lorafleet" if name == "lorafleet" else name.split(".")[1]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_every_module_has_a_stage():
    modules = package_modules()
    assert len(modules) > 60                    # the scan found the package
    unplaced = sorted({stage_of(m) for m in modules if m != "lorafleet"} - set(RANKS))
    assert not unplaced, f"packages with no stage in RANKS: {unplaced}"
    assert facade_names(modules), "lorafleet/__init__.py: no _API table found"


def test_imports_only_stages_to_the_left():
    modules = package_modules()
    graph = import_graph()
    facade_rank = max(rank(m, 0) for m in facade_names(modules))
    wrong = []
    for name, targets in sorted(graph.items()):
        for target in sorted(targets):
            if stage_of(name) == stage_of(target) and name != "lorafleet":
                continue                         # modules of one package (checked for cycles)
            if not rank(target, facade_rank) < rank(name, facade_rank):
                wrong.append(f"{name} (stage {stage_of(name)}) imports {target} "
                             f"(stage {stage_of(target)})")
    assert not wrong, "imports to the right or between siblings:\n" + "\n".join(wrong)


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "modules that import each other in a circle: " + "; ".join(
        " <-> ".join(component) for component in found)


def test_the_checks_catch_what_they_look_for(tmp_path):
    """The scanner sees deferred and relative imports, and the cycle finder finds a circle."""
    package = tmp_path / "lorafleet"
    (package / "serve").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "serve" / "__init__.py").write_text("")
    (package / "serve" / "a.py").write_text("def f():\n    from . import b\n")
    (package / "serve" / "b.py").write_text("from lorafleet.serve.a import f\n"
                                            "import lorafleet.cli\n")
    (package / "cli.py").write_text("")
    modules = {"lorafleet": package / "__init__.py", "lorafleet.cli": package / "cli.py",
               "lorafleet.serve": package / "serve" / "__init__.py",
               "lorafleet.serve.a": package / "serve" / "a.py",
               "lorafleet.serve.b": package / "serve" / "b.py"}
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    assert graph["lorafleet.serve.a"] == {"lorafleet.serve.b"}
    assert graph["lorafleet.serve.b"] == {"lorafleet.serve.a", "lorafleet.cli"}
    assert cycles(graph) == [["lorafleet.serve.a", "lorafleet.serve.b"]]
    assert rank("lorafleet.cli", 0) > rank("lorafleet.serve.b", 0)
