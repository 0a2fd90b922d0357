"""The packages' layers, read from their import statements (every one, at module level or in a function): no
import cycles, and each layer imports only those below it (docs/layout.md)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def modules() -> dict[str, Path]:
    found = {}
    for package in ("minipythia", "eval"):
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the project's modules it imports (`from . import x` imports the module x, not the package)."""
    mods = modules()
    graph = {name: set() for name in mods}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in mods]
                targets = subs if len(subs) == len(node.names) else [target, *subs]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
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

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def imports_of(graph, prefix: str) -> set[str]:
    return {target for name, targets in graph.items() if name == prefix or name.startswith(prefix + ".")
            for target in targets}


def test_each_layer_imports_only_those_below_it():
    graph = import_graph()
    # The model package never reaches into the evaluation.
    assert not {t for t in imports_of(graph, "minipythia") if t.split(".")[0] == "eval"}
    # The cache knows no policy, model or generation: only its stores, the rotary and the clock.
    assert imports_of(graph, "minipythia.kv") <= {f"minipythia.kv.{m}" for m in
                                                   ("cache", "dense", "ragged", "pruned_keys", "quantized",
                                                    "quantization", "store")} | {"minipythia.timing", "minipythia.rotary",
                                                                                      "minipythia.config"}
    # Policies do not import the model (its rotary lives apart), nor the command lines.
    policies = imports_of(graph, "minipythia.compressors")
    assert "minipythia.model" not in policies and "minipythia.cli" not in policies
    # Benchmarks and the pipeline do not import the command line.
    assert "eval.__main__" not in imports_of(graph, "eval.bench")
