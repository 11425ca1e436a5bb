"""The package's layering, read from the source with `ast` (nothing is imported).

Layers, top to bottom; a module may import from its own layer and from the layers below it:

    sim          the simulator and its calibration/replay tools (they drive the real engine)
    entrypoints  api, cli, server, serving, protocol, bench
    engine       LLMEngine and the async engine
    cluster      process lifecycle and the worker loop, the gManager's pure policy, messages
    worker       instance, scheduler, model runner, CUDA graphs, threads, migration
    attention    reference ops, the ops choice, the step layout, DistAttention
    models       the model math, its layers, RoPE, the loader
    kernels      the Triton GPU kernels and their tuning tables
    kvcache      pool, rManager, the BlockAllocator protocol, PagedBatch (the kernels' argument)

The foundation modules at the package root (config, sampling, request, comm, outputs, version)
may be imported from anywhere and import only one another. Nothing imports sim, and nothing
inside the package imports the package itself (`infinite_llm/__init__.py`, the public facade
that imports the engine and the entrypoints). Every import counts: inside functions, under
`TYPE_CHECKING`, relative or absolute. The graph of layers and foundation modules has no cycle.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = "infinite_llm"
SOURCE = Path(__file__).resolve().parents[1] / ROOT
LAYERS = ("kvcache", "kernels", "models", "attention", "worker", "cluster", "engine",
          "entrypoints", "sim")  # bottom to top
FOUNDATION = frozenset({"config", "sampling", "request", "comm", "outputs", "version"})
RANK = {layer: rank for rank, layer in enumerate(LAYERS)}


@dataclass(frozen=True, slots=True)
class Edge:
    module: str
    line: int
    target: str

    def __str__(self) -> str:
        return f"{self.module}:{self.line} -> {self.target}"


def module_name(path: Path, source: Path) -> str:
    parts = path.relative_to(source.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(source: Path = SOURCE) -> dict[str, Path]:
    return {module_name(p, source): p for p in sorted(source.rglob("*.py"))}


def node(module: str) -> str | None:
    """The layer, foundation module or facade a module belongs to (None: none of them)."""
    if module == ROOT:
        return ROOT
    top = module.split(".")[1]
    if top in FOUNDATION and module.count(".") == 1:
        return top
    return top if top in RANK else None


def imports(module: str, text: str, known: set[str], is_package: bool) -> list[Edge]:
    """Every import of a project module in `text`, wherever it stands in the file."""
    edges = []
    package = module if is_package else module.rpartition(".")[0]
    for stmt in ast.walk(ast.parse(text)):
        if isinstance(stmt, ast.Import):
            names = [alias.name for alias in stmt.names]
        elif isinstance(stmt, ast.ImportFrom):
            base = stmt.module or ""
            if stmt.level:
                anchor = package.split(".")[: len(package.split(".")) - stmt.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            # `from pkg import sub` imports the submodule; `from mod import name`, the module.
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                     for a in stmt.names]
        else:
            continue
        edges += [Edge(module, stmt.lineno, name) for name in dict.fromkeys(names)
                  if name == ROOT or name.startswith(ROOT + ".")]
    return sorted(edges, key=lambda edge: edge.line)


def project_edges(source: Path = SOURCE) -> list[Edge]:
    found = modules(source)
    known = set(found)
    return [edge for name, path in found.items()
            for edge in imports(name, path.read_text(), known, path.name == "__init__.py")]


def why_not(source: str, target: str) -> str | None:
    """Why the import breaks the layering, or None when it is allowed."""
    here, there = node(source), node(target)
    if here is None or there is None:
        return f"{source if here is None else target} is in no layer"
    if here == there:
        return None
    if there == "sim":
        return "nothing imports sim"
    if there == ROOT:
        return "the facade is imported by users, not by its own modules"
    if here == ROOT:
        return None
    if here in FOUNDATION:
        return None if there in FOUNDATION else f"foundation {here} imports layer {there}"
    if there in FOUNDATION:
        return None
    if RANK[there] > RANK[here]:
        return f"{here} imports {there}, a layer above it"
    return None


def violations(edges: list[Edge]) -> list[str]:
    return [f"{edge}  ({reason})" for edge in edges
            if (reason := why_not(edge.module, edge.target)) is not None]


def cycles(edges: list[Edge]) -> list[list[str]]:
    """The strongly connected groups of more than one node in the node graph (Tarjan)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for edge in edges:
        a, b = node(edge.module), node(edge.target)
        if a is not None and b is not None and a != b:
            graph[a].add(b)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


def test_every_module_is_in_a_layer() -> None:
    lost = [name for name in modules() if node(name) is None]
    assert not lost, "modules in no layer (add them to LAYERS or FOUNDATION):\n" + "\n".join(lost)


def test_imports_go_down_the_layers() -> None:
    bad = violations(project_edges())
    assert not bad, f"{len(bad)} imports break the layering:\n" + "\n".join(bad)


def test_the_layer_graph_has_no_cycle() -> None:
    edges = project_edges()
    found = cycles(edges)
    detail = [f"cycle {' <-> '.join(group)}:\n" + "\n".join(
        f"  {e}" for e in edges if node(e.module) in group and node(e.target) in group
        and node(e.module) != node(e.target)) for group in found]
    assert not found, "\n".join(detail)


def test_the_gmanager_is_pure_policy() -> None:
    """The gManager imports only the standard library (no torch, no sockets, nothing of the
    package), so the simulator reuses it unchanged and it is tested as a function."""
    tree = ast.parse((SOURCE / "cluster" / "gmanager.py").read_text())
    imported = {alias.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
                for alias in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree)
                 if isinstance(n, ast.ImportFrom) and n.module and not n.level}
    allowed = {"__future__", "collections", "dataclasses", "heapq", "itertools", "math",
               "typing"}
    assert imported <= allowed, sorted(imported - allowed)


# ---- the checker itself, on a package written here ------------------------------------------

FAKE = {
    "__init__.py": "from infinite_llm.engine.core import Engine\n",
    "request.py": "from infinite_llm.sampling import Params\n",
    "sampling.py": "",
    "outputs.py": "from infinite_llm.kvcache.rmanager import KVStats\n",
    "engine/__init__.py": "",
    "engine/core.py": "from ..worker import scheduler\nfrom . import helpers\n",
    "engine/helpers.py": "",
    "worker/__init__.py": "",
    "worker/scheduler.py": (
        "from typing import TYPE_CHECKING\n"
        "from infinite_llm.request import Request\n"
        "if TYPE_CHECKING:\n"
        "    from infinite_llm.cluster.gmanager import Lease\n"
        "def f():\n"
        "    import infinite_llm.engine.core\n"
        "    from infinite_llm import Engine\n"
    ),
    "kvcache/__init__.py": "",
    "kvcache/rmanager.py": "from .. import request\n",
    "cluster/__init__.py": "",
    "cluster/gmanager.py": "from infinite_llm.worker.scheduler import X\n",
}


@pytest.fixture
def fake_package(tmp_path: Path) -> Path:
    source = tmp_path / ROOT
    for name, text in FAKE.items():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_text(text)
    return source


def test_the_checker_finds_every_kind_of_import(fake_package: Path) -> None:
    edges = project_edges(fake_package)
    assert sorted(map(str, edges)) == [
        "infinite_llm.cluster.gmanager:1 -> infinite_llm.worker.scheduler",
        "infinite_llm.engine.core:1 -> infinite_llm.worker.scheduler",
        "infinite_llm.engine.core:2 -> infinite_llm.engine.helpers",
        "infinite_llm.kvcache.rmanager:1 -> infinite_llm.request",
        "infinite_llm.outputs:1 -> infinite_llm.kvcache.rmanager",
        "infinite_llm.request:1 -> infinite_llm.sampling",
        "infinite_llm.worker.scheduler:2 -> infinite_llm.request",
        "infinite_llm.worker.scheduler:4 -> infinite_llm.cluster.gmanager",
        "infinite_llm.worker.scheduler:6 -> infinite_llm.engine.core",
        "infinite_llm.worker.scheduler:7 -> infinite_llm",
        "infinite_llm:1 -> infinite_llm.engine.core",
    ]
    assert violations(edges) == [
        "infinite_llm.outputs:1 -> infinite_llm.kvcache.rmanager  "
        "(foundation outputs imports layer kvcache)",
        "infinite_llm.worker.scheduler:4 -> infinite_llm.cluster.gmanager  "
        "(worker imports cluster, a layer above it)",
        "infinite_llm.worker.scheduler:6 -> infinite_llm.engine.core  "
        "(worker imports engine, a layer above it)",
        "infinite_llm.worker.scheduler:7 -> infinite_llm  "
        "(the facade is imported by users, not by its own modules)",
    ]
    assert cycles(edges) == [["cluster", "engine", "infinite_llm", "worker"]]
