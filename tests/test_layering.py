"""The package's import graph has no cycles: every import counts, those inside functions too, and a top-level module
(cli.py, config.py, ...) is a node of its own, as each subpackage is (lorafuse/accel, lorafuse/model, ...)."""

from __future__ import annotations

import ast
from pathlib import Path

import lorafuse

ROOT = Path(lorafuse.__file__).parent


def _node(module: str) -> str:
    """lorafuse.model.load -> lorafuse.model; lorafuse.cli -> lorafuse.cli; lorafuse -> lorafuse."""
    return ".".join(module.split(".")[:2])


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = ("lorafuse", *path.relative_to(ROOT).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """{node: nodes it imports}, from every import statement of every module of the package."""
    modules, edges = _modules(), {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(
                        [*package.split(".")[: len(package.split(".")) - node.level + 1], *filter(None, [base])]
                    )
                # `from lorafuse import accel` imports the subpackage lorafuse.accel, not the package itself
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for target in targets:
                if target.split(".")[0] == "lorafuse" and _node(target) != _node(name):
                    edges.setdefault(_node(name), set()).add(_node(target))
    edges.setdefault("lorafuse", set()).update(_node(m) for m in _lazy_exports())
    return edges


def _lazy_exports() -> list[str]:
    """The modules `lorafuse/__init__.py` imports on first use of a name (its _EXPORTS table): imports too."""
    tree = ast.parse((ROOT / "__init__.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "_EXPORTS" for t in node.targets):
            return [v.value for v in node.value.values]
    return []


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_package_import_graph_has_no_cycles():
    edges = import_graph()
    assert len(edges) >= 10, "the graph reader found the package's modules"
    found = cycles(edges)
    paths = {c[0]: [f"{a} -> {b}" for a in c for b in sorted(edges[a]) if b in c] for c in found}
    assert not found, f"import cycles: {paths}"


def test_the_cycle_finder_finds_a_planted_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
