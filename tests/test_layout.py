"""The import graph of `src/ditforge`, built from the source: no circles, and no arrow from a
lower layer to a higher one.

Every `import` and `from ... import` counts, at module level or inside a function (an import
deferred into a function is still a dependency); only imports under `if TYPE_CHECKING:` are
left out, since they never run. `from package import name` is an arrow to `package.name` when
that is a module, else to `package`.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

#: The layers, bottom first: a module may import its own layer and the ones below. A module
#: belongs to the longest prefix that names it.
LAYERS: list[tuple[str, ...]] = [
    ("ditforge", "ditforge.errors", "ditforge.flags", "ditforge.progress", "ditforge.npz",
     "ditforge.folder_lock", "ditforge.checksums", "ditforge.preemption", "ditforge.write_failures"),  # no ditforge imports but errors
    ("ditforge.models", "ditforge.diffusion", "ditforge.flow", "ditforge.meanflow"),  # networks and the maths of each objective
    ("ditforge.objectives",),  # the objective boundary
    # device, torchrun and checkpoint files: everything that runs or stores a model uses them,
    # so they sit low although they live in train/
    ("ditforge.train.device", "ditforge.train.distributed", "ditforge.train.checkpoint"),
    ("ditforge.data", "ditforge.pictures"),  # sources, autoencoders, the latent store, loaders
    ("ditforge.metrics",),  # the ground floor of evaluation: statistics, Frechet distance, FID & co
    ("ditforge.repa",),  # REPA's encoders (one of them metrics' Inception) and aligner
    ("ditforge.config",),  # the typed run config, which checks REPA's encoder names
    ("ditforge.formats",),  # model formats in and out
    ("ditforge.sampling",),  # saved model -> samples; the `sample` command
    ("ditforge.evaluation",),  # how good the samples are; the `eval` command
    ("ditforge.train", "ditforge.bench"),  # the training loop, its previews; the benchmark command
    ("ditforge.cli", "ditforge.__main__", "ditforge.export", "ditforge.verify"),  # the commands' entry points
]


def _modules() -> dict[str, Path]:
    mods = {}
    for path in (SRC / "ditforge").rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def import_graph() -> dict[str, set[str]]:
    """module -> the ditforge modules it imports."""
    mods = _modules()

    def known(name: str) -> str:
        while name not in mods and "." in name:
            name = name.rsplit(".", 1)[0]
        return name

    graph = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        tree = ast.parse(path.read_text(), str(path))
        skip = _type_checking_nodes(tree)
        targets = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                targets.update(known(a.name) for a in node.names if a.name.split(".")[0] == "ditforge")
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                if base.split(".")[0] != "ditforge":
                    continue
                targets.update(known(f"{base}.{a.name}") if f"{base}.{a.name}" in mods else known(base) for a in node.names)
        graph[name] = targets - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan 1972), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layer_of(module: str) -> int:
    best = max(((len(p), i) for i, layer in enumerate(LAYERS) for p in layer if module == p or module.startswith(p + ".")),
               default=None)
    assert best is not None, f"{module} is in no layer of tests/test_layout.py: add it where it belongs"
    return best[1]


def test_the_graph_sees_imports_inside_functions_and_skips_type_checking():
    graph = import_graph()
    assert "ditforge.train.trainer" in graph["ditforge.cli"]  # cli imports the trainer inside a function
    assert "ditforge.config" not in graph["ditforge.data.training_data"]  # only under TYPE_CHECKING


def test_cycles_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles_in_src():
    found = cycles(import_graph())
    assert not found, "import circles: " + "; ".join(" <-> ".join(c) for c in found)


def test_no_arrow_from_a_lower_layer_to_a_higher_one():
    upward = [f"{m} -> {d}" for m, targets in import_graph().items() for d in sorted(targets) if layer_of(d) > layer_of(m)]
    assert not upward, "imports from a lower layer to a higher one (move the code, or the module, to its layer): " + "; ".join(upward)
