"""bnref's floors (docs/architecture.md): spec -> leaves -> backends -> tools -> CLI, imports only
downward, one backend registry. Read from the code's own imports (lazy ones included: a
function-level import is an import all the same), so that a new module or a new backend that
breaks the shape fails here, naming the file."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys
from types import SimpleNamespace

import pytest

from bnref import backends

ROOT = pathlib.Path(backends.__file__).parent  # bnref/
PROJECT = ROOT.parent


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PROJECT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imports_of(name: str) -> set:
    """The bnref modules ``name`` imports anywhere in its file (top level or in a function).

    ``from bnref.x import y`` is an import of ``bnref.x.y`` when that is a module, else of
    ``bnref.x``; an implicit import of a parent package is not counted (every submodule has one)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:  # bnref.jax.train.fit -> bnref.jax.train
                target = target.rpartition(".")[0]
            if target.startswith("bnref") and target != name:
                found.add(target)
    return found


GRAPH = {name: imports_of(name) for name in MODULES}


def _cycles(graph) -> list:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_is_read_from_the_code():
    """The reader itself: it sees top-level, function-level and from-imports of modules."""
    assert "bnref.config" in GRAPH["bnref.runs"]
    assert "bnref.backends" in GRAPH["bnref.train"]
    assert "bnref.jax.distributed" in GRAPH["bnref.jax.train"]  # `from bnref.jax import distributed`
    assert "bnref.runs" in GRAPH["bnref.jax.train"]  # a function-level import
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]


def test_no_import_cycle_between_bnref_modules_lazy_imports_included():
    assert _cycles(GRAPH) == []


def test_nothing_imports_the_cli():
    """bnref.train is the top floor: it imports everything it needs, nothing imports it."""
    bad = sorted(name for name, deps in GRAPH.items() if "bnref.train" in deps)
    assert bad == [], f"these import the CLI bnref.train: {bad}"


#: the floors above the backends: tools and the CLI
ABOVE_BACKENDS = ("bnref.train", "bnref.training", "bnref.bench", "bnref.parity", "bnref.diagnose", "bnref.experiments",
                  "bnref.convert")  # fmt: skip


@pytest.mark.parametrize("package", [b.package for b in backends.REGISTRY.values()])
def test_a_backend_imports_nothing_above_it_nor_another_backend(package):
    """... except the backends its registry entry says it builds on (``builds_on``: NNX on JAX)."""
    entry = next(b for b in backends.REGISTRY.values() if b.package == package)
    allowed = {backends.get(name).package for name in entry.builds_on} | {package}
    others = tuple(b.package for b in backends.REGISTRY.values() if b.package not in allowed)
    for name, deps in GRAPH.items():
        if name == package or name.startswith(package + "."):
            bad = sorted(d for d in deps if d.startswith(ABOVE_BACKENDS + others))
            assert bad == [], f"{MODULES[name].relative_to(PROJECT)} imports {bad}"


def test_only_the_registry_turns_a_backend_name_into_a_module():
    """No ``import_module(f"bnref.{name}...")`` and no branch on a backend's name (``backend ==
    "jax"``) outside the backends and the registry: a new backend is one subpackage and one
    registry entry."""
    names = set(backends.REGISTRY)
    packages = tuple(b.package + "." for b in backends.REGISTRY.values())
    for name, path in MODULES.items():
        if name == "bnref.backends" or (name + ".").startswith(packages):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            where = f"{path.relative_to(PROJECT)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module":
                arg = node.args[0] if node.args else None
                assert not isinstance(arg, ast.JoinedStr) or "bnref." not in ast.unparse(arg), \
                    f"{where}: a backend module named by string outside the registry"  # fmt: skip
            if isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
                strings = {s.value for s in sides if isinstance(s, ast.Constant)}
                strings |= {e.value for s in sides if isinstance(s, (ast.Tuple, ast.List, ast.Set)) for e in s.elts
                            if isinstance(e, ast.Constant)}  # fmt: skip
                about_backend = any("backend" in ast.unparse(s) for s in sides)
                assert not (about_backend and strings & names), f"{where}: branches on a backend's name: {ast.unparse(node)}"


@pytest.mark.parametrize("name", sorted(backends.REGISTRY))
def test_every_registered_backend_implements_the_interface(name):
    module = backends.load(name)  # raises TypeError naming what is missing
    for function in backends.INTERFACE:
        assert callable(getattr(module, function)), f"{module.__name__}.{function}"
    assert module.__name__ == f"{backends.get(name).package}.backend"
    for impl, (runner, _) in backends.get(name).parity.items():
        assert callable(getattr(backends.get(name).runners(), runner)), f"{impl}: {runner}"


def test_a_backend_missing_part_of_the_interface_is_refused_naming_it(monkeypatch):
    incomplete = SimpleNamespace(__name__="fake.backend", fit=lambda *a: [], prepare=lambda c: "cpu")
    monkeypatch.setitem(sys.modules, "fake.backend", incomplete)
    with pytest.raises(TypeError, match=r"backend 'fake' \(fake.backend\) does not implement resolve_device, device_name"):
        backends.Backend("fake", "fake", "Fake").load()
    with pytest.raises(ValueError, match=r"backend must be one of \('jax', 'nnx', 'torch'\), got 'mxnet'"):
        backends.get("mxnet")


def test_only_the_jax_backend_is_built_on_and_nothing_builds_on_the_backends_that_build():
    """``builds_on`` names registered backends, and the graph it allows has no cycle (torch builds
    on nothing; NNX on JAX, which builds on nothing)."""
    for b in backends.REGISTRY.values():
        for name in b.builds_on:
            assert name in backends.REGISTRY and name != b.name, f"{b.name} builds on {name!r}"
            assert not backends.get(name).builds_on, f"{b.name} builds on {name}, which builds on another"
    assert backends.get("nnx").builds_on == ("jax",) and not backends.get("torch").builds_on


def test_the_host_devices_are_asked_for_only_before_jax_starts(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_foo=1 --xla_force_host_platform_device_count=3")
    monkeypatch.delitem(sys.modules, "jax", raising=False)
    backends.provide_host_devices(4)
    import os

    assert os.environ["XLA_FLAGS"] == "--xla_foo=1 --xla_force_host_platform_device_count=4"
    monkeypatch.setitem(sys.modules, "jax", object())  # JAX has started: too late, and nothing changes
    backends.provide_host_devices(2)
    assert os.environ["XLA_FLAGS"].endswith("count=4")


#: modules that import no framework (and nothing heavy) when imported: everything but the backends
FRAMEWORK_FREE = sorted(name for name in MODULES
                        if not (name + ".").startswith(tuple(b.package + "." for b in backends.REGISTRY.values()))
                        and not name.endswith("__main__"))  # fmt: skip
HEAVY = ("torch", "jax", "flax", "optax", "matplotlib", "tqdm", "tensorflow_datasets")


def test_the_framework_free_modules_import_no_framework():
    """``import bnref`` and every module outside the backends import no framework: one process,
    each module imported in turn, the first that pulls one in named."""
    code = ("import importlib, sys\n"
            f"for name in {FRAMEWORK_FREE!r}:\n"
            "    importlib.import_module(name)\n"
            f"    heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
            "    assert not heavy, f'import {name} imported {heavy}'\n")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], cwd=PROJECT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr.strip().splitlines()[-1]
    assert {"bnref", "bnref.spec", "bnref.backends", "bnref.train", "bnref.bench"} <= set(FRAMEWORK_FREE)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_is_over_700_lines_and_each_says_what_it_owns(name):
    path = MODULES[name]
    text = path.read_text()
    assert len(text.splitlines()) <= 700, f"{path.relative_to(PROJECT)}: {len(text.splitlines())} lines"
    assert ast.get_docstring(ast.parse(text)), f"{path.relative_to(PROJECT)} has no opening docstring"
