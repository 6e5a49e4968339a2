"""No import cycle inside fastnet.

Layers import downwards only (DESIGN.md: kernels, transport, loop, servers and
RPC, face). Every ``import`` of a fastnet module is read with ``ast`` from the
source, at module level and inside functions alike (a function-level import
that points upwards is the same tangle, only deferred); imports under ``if
TYPE_CHECKING:`` are left out, as they never run. A cycle fails the test,
named module by module.
"""
import ast
import pathlib

import fastnet

PACKAGE = pathlib.Path(fastnet.__file__).resolve().parent


def _modules():
    """{dotted name: path} of every Python module in the fastnet package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(test):
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_nodes(tree):
    """Every node of the tree except those under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _imports(name, path, modules):
    """{imported fastnet module: first line} for one module."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = {}

    def add(target, line):
        # the named module itself; for ``from X import y`` the submodule X.y when there is one
        if target in modules and target != name:
            found.setdefault(target, line)

    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                if f"{source}.{alias.name}" in modules:
                    add(f"{source}.{alias.name}", node.lineno)
                else:
                    add(source, node.lineno)
    return found


def import_graph():
    """{module: {imported module: line}} over the whole package."""
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def cycles(graph):
    """Every strongly connected component of more than one module (or a module importing itself)."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []

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
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph[v]:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def _describe(comp, graph):
    edges = [f"{a} -> {b} (line {graph[a][b]})" for a in comp for b in sorted(graph[a]) if b in comp]
    return " <-> ".join(comp) + ": " + "; ".join(edges)


def test_the_graph_sees_the_package():
    graph = import_graph()
    assert {"fastnet", "fastnet.connection", "fastnet._kernels", "fastnet._pure.framing"} <= set(graph)
    assert "fastnet._kernels" in graph["fastnet.connection"]
    # a function-level import counts; one under TYPE_CHECKING does not
    assert "fastnet._c" not in graph["fastnet._kernels"]


def test_cycles_are_found():
    """The detector itself: a two-module cycle and a self-import are reported, a chain is not."""
    assert cycles({"a": {"b": 1}, "b": {"a": 2}, "c": {"a": 3}}) == [["a", "b"]]
    assert cycles({"a": {"a": 1}}) == [["a"]]
    assert cycles({"a": {"b": 1}, "b": {"c": 1}, "c": {}}) == []


def test_no_import_cycle_inside_fastnet():
    graph = import_graph()
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(_describe(c, graph) for c in found)


def test_only_the_kernel_loader_imports_the_pure_twins():
    """Above the kernels, code uses the active kernel set (``fastnet._kernels``), never the pure one by name.

    Otherwise the pure twin loads beside the compiled kernels, and the code
    above them runs on the twin whichever set is active.
    """
    graph = import_graph()
    offenders = [f"{mod} -> {dep} (line {line})" for mod, deps in sorted(graph.items())
                 if not (mod == "fastnet._pure" or mod.startswith("fastnet._pure.") or mod == "fastnet._kernels")
                 for dep, line in sorted(deps.items())
                 if dep == "fastnet._pure" or dep.startswith("fastnet._pure.")]
    assert not offenders, "imports of fastnet._pure above the kernels:\n" + "\n".join(offenders)
