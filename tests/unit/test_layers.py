"""The shim's layers hold (issue #17; docs/architecture.md, "Layers"): read from the source, every
import counted wherever it is (module level, inside functions, under TYPE_CHECKING, `from . import x`).

- binary (the processes' entry points: `__main__`, the start/delete actions, the spare, the `kata-py`
  tools) may import anything; nothing else imports it;
- foundation (the names every process shares: paths, command lines, configuration, errors) imports
  only foundation;
- runtime (the daemon and everything it runs: service, sandbox, VM shape, factory, network, ...)
  imports runtime and foundation;
- no import cycle among shim's modules, however deep inside a function it hides;
- ttrpc/, vmm/ and agent_client/ import nothing of shim/, and ttrpc/ nothing of protos/ but its own
  envelope (KNOWN_TTRPC_PROTOS).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

BINARY = ("shim.__main__", "shim.manager", "shim.spare", "shim.cli", "shim.check")  # and below
FOUNDATION = ("shim", "shim.layout", "shim.args", "shim.config", "shim.errors", "shim.oci", "shim.wire",
              "shim.timing")
# cycles that are known and out of scope, each a frozenset of modules (none today: add one only with
# a comment saying why it stays, and never to let a new one pass)
KNOWN_CYCLES: set[frozenset[str]] = set()
# ttrpc's envelope (Request/Response/Status) is generated into protos/ttrpc/ by protos.generate like
# every other proto; moving the generated module into ttrpc/ would be the step to let ttrpc ship alone
KNOWN_TTRPC_PROTOS = {("ttrpc.codec", "protos.ttrpc.ttrpc_pb2")}


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    where: str  # path:line
    statement: str

    def __str__(self) -> str:
        return f"{self.where}: {self.importer} imports {self.imported} ({self.statement})"


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(root: Path, packages: Iterable[str]) -> dict[str, Path]:
    return {module_name(root, p): p for package in packages for p in sorted((root / package).rglob("*.py"))
            if "__pycache__" not in p.parts}


def imports_of(root: Path, name: str, path: Path, known: set[str]) -> list[Import]:
    """Every import in `path` (module `name`), resolved to a module where one exists: `from a import
    b` is a.b when a.b is a module, else a."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[Import] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        where = f"{path.relative_to(root)}:{node.lineno}"
        statement = ast.unparse(node)
        found += [Import(name, t, where, statement) for t in dict.fromkeys(targets)]
    return found


def graph(root: Path, packages: Iterable[str] = ("shim", "ttrpc", "vmm", "agent_client", "protos")) -> list[Import]:
    known = modules(root, packages)
    return [i for name, path in known.items() for i in imports_of(root, name, path, set(known))]


def layer(name: str) -> str:
    if any(name == b or name.startswith(b + ".") for b in BINARY):
        return "binary"
    if name in FOUNDATION:
        return "foundation"
    return "runtime"


def layer_violations(edges: Iterable[Import]) -> list[Import]:
    allowed = {"binary": {"binary", "runtime", "foundation"}, "runtime": {"runtime", "foundation"},
               "foundation": {"foundation"}}
    return [e for e in edges if e.importer.startswith("shim") and e.imported.split(".")[0] == "shim"
            and layer(e.imported) not in allowed[layer(e.importer)]]


def cycles(edges: Iterable[Import], prefix: str = "shim") -> list[tuple[frozenset[str], list[Import]]]:
    """The strongly connected components (more than one module, or one importing itself) of the
    import graph among `prefix`'s modules, each with the imports inside it (Tarjan)."""
    inner = [e for e in edges if e.importer.split(".")[0] == prefix and e.imported.split(".")[0] == prefix]
    succ: dict[str, list[str]] = {}
    for e in inner:
        succ.setdefault(e.importer, []).append(e.imported)
        succ.setdefault(e.imported, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[frozenset[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in succ[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1 or v in succ[v]:
                components.append(frozenset(component))

    for v in sorted(succ):
        if v not in index:
            visit(v)
    return [(c, [e for e in inner if e.importer in c and e.imported in c]) for c in components]


EDGES = graph(REPO)


def test_the_graph_sees_function_level_and_relative_imports() -> None:
    # what hid the cycle: imports inside functions, `from . import x`
    pairs = {(e.importer, e.imported) for e in EDGES}
    assert ("shim.__main__", "shim.daemon") in pairs  # `from . import daemon` inside main()
    assert ("shim.spare", "shim.daemon") in pairs  # inside preload()
    assert ("shim.manager", "shim.resources.cgroups") in pairs  # inside cleanup_host_cgroups()


def test_no_module_imports_a_layer_above_its_own() -> None:
    bad = layer_violations(EDGES)
    assert not bad, "imports against the layers:\n" + "\n".join(map(str, bad))


def test_no_new_import_cycle_among_shim_modules() -> None:
    found = cycles(EDGES)
    new = [(c, inside) for c, inside in found if c not in KNOWN_CYCLES]
    assert not new, "import cycles:\n" + "\n\n".join(
        f"{sorted(c)}:\n" + "\n".join(f"  {e}" for e in inside) for c, inside in new)
    gone = KNOWN_CYCLES - {c for c, _ in found}
    assert not gone, f"known cycles that are gone (remove them from KNOWN_CYCLES): {gone}"


def test_ttrpc_vmm_and_agent_client_stand_without_shim_and_ttrpc_without_protos() -> None:
    bad = [e for e in EDGES if e.importer.split(".")[0] in ("ttrpc", "vmm", "agent_client")
           and e.imported.split(".")[0] == "shim"]
    bad += [e for e in EDGES if e.importer.split(".")[0] == "ttrpc" and e.imported.split(".")[0] == "protos"
            and (e.importer, e.imported) not in KNOWN_TTRPC_PROTOS]
    assert not bad, "\n".join(map(str, bad))


# --- the checker itself, on a made-up tree: it must be able to fail ---------------------------------
@pytest.fixture
def fake(tmp_path: Path) -> Path:
    files = {
        "shim/__init__.py": "",
        "shim/manager.py": "from .layout import X\n",
        "shim/layout.py": "X = 1\n",
        "shim/sandbox.py": "def f():\n    from . import manager\n",  # runtime -> binary, hidden
        "shim/a.py": "import shim.b\n",
        "shim/b.py": "def g():\n    from .c import y\n",
        "shim/c.py": "from . import a\ny = 1\n",  # a -> b -> c -> a
        "shim/pkg/__init__.py": "",
        "shim/pkg/d.py": "from .. import layout\nfrom ..pkg import d\n",  # imports itself
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


def test_the_checker_names_a_hidden_runtime_to_binary_import(fake: Path) -> None:
    bad = layer_violations(graph(fake, ("shim",)))
    assert [(e.importer, e.imported, e.where) for e in bad] == [("shim.sandbox", "shim.manager",
                                                                 "shim/sandbox.py:2")]


def test_the_checker_finds_cycles_through_functions_and_self_imports(fake: Path) -> None:
    found = {c: sorted(e.where for e in inside) for c, inside in cycles(graph(fake, ("shim",)))}
    assert found == {frozenset({"shim.a", "shim.b", "shim.c"}): ["shim/a.py:1", "shim/b.py:2", "shim/c.py:1"],
                     frozenset({"shim.pkg.d"}): ["shim/pkg/d.py:2"]}
