# conftest.py for running Flax's own NNX tests that build an nnx.BatchNorm against flax.nnx (default,
# BNREF_SWAP=0), bnref.nnx (BNREF_SWAP=1) or bnref.nnx with Flax's use_fast_variance=True default
# (BNREF_SWAP=fast); see README "Flax's own NNX tests" (google/flax b1b1c18481dc for flax 0.12.8).
# Copy it as conftest.py into the folder above Flax's tests/ (`git archive <commit> tests/nnx`; its
# files are not ours to commit) and run `python -m pytest tests/nnx -p no:cacheprovider`.
# BNREF_SELECT=all runs every test and also lists the unselected ones that built a BatchNorm.
#
# Only the tests that name nnx.BatchNorm run: in the test function's source, the module-level helpers
# it names (recursively), its class's setUp, or its parameters (absl's parameterized cases that pass
# nnx.BatchNorm itself). Each test counts the BatchNorm layers it builds; the summary line names the
# class under test and the selected tests that built none, so a swap that did not take effect, or a
# selection that drifted, shows in the report.
import functools
import inspect
import os
import re
import types

import flax.nnx
import flax.nnx.nn.normalization
import flax.nnx.summary

SWAP = os.environ.get("BNREF_SWAP", "0")  # 0: flax.nnx; 1: bnref.nnx; fast: bnref.nnx, Flax's variance default
FLAX_BN = flax.nnx.BatchNorm
if SWAP != "0":
    import bnref.nnx

    BN = bnref.nnx.BatchNorm
    if SWAP == "fast":  # which failures the use_fast_variance default explains

        class BatchNorm(BN):
            def __init__(self, *args, use_fast_variance=True, **kwargs):
                super().__init__(*args, use_fast_variance=use_fast_variance, **kwargs)

        BatchNorm.__module__ = "bnref.nnx(use_fast_variance=True)"  # the name tables print stays BatchNorm
        BN = BatchNorm
    else:
        assert SWAP == "1", SWAP
    flax.nnx.BatchNorm = BN  # tests write nnx.BatchNorm(...): looked up at call time
    flax.nnx.nn.normalization.BatchNorm = BN
else:
    BN = FLAX_BN

NAMED = re.compile(r"\bnnx\.BatchNorm\b")  # flax.linen's BatchNorm (bridge tests) is not under test
built = {"n": 0}
_init = BN.__init__


@functools.wraps(_init)
def _counting_init(self, *args, **kwargs):
    built["n"] += 1
    return _init(self, *args, **kwargs)


BN.__init__ = _counting_init


# nnx.tabulate replaces the methods of every class in the model while it traces and puts them back
# only when tracing succeeds: one failing tabulate (a deliberate refusal) would leave RngStream and the
# rest patched and fail every later test in the process. Put them back on failure too, so that each
# test passes or fails on its own (the same for flax.nnx and bnref.nnx).
_MISSING = object()
_overwrite = flax.nnx.summary._overwrite_methods
_tabulate = flax.nnx.summary.tabulate


@functools.wraps(_tabulate)
def _restoring_tabulate(*args, **kwargs):
    saved = {}

    def overwrite(env):
        for obj_type, name in env:
            saved.setdefault((obj_type, name), vars(obj_type).get(name, _MISSING))
        _overwrite(env)

    flax.nnx.summary._overwrite_methods = overwrite
    try:
        return _tabulate(*args, **kwargs)
    except BaseException:
        for (obj_type, name), method in saved.items():
            if method is _MISSING:
                delattr(obj_type, name)
            else:
                setattr(obj_type, name, method)
        raise
    finally:
        flax.nnx.summary._overwrite_methods = _overwrite


flax.nnx.tabulate = flax.nnx.summary.tabulate = _restoring_tabulate


def _mentions(obj, module, seen):
    """Whether obj names BatchNorm: is the class, holds it (parameters), or its source (decorators
    left out) names it, directly or through a module-level helper it uses."""
    if id(obj) in seen:
        return False
    seen.add(id(obj))
    if obj is FLAX_BN or obj is BN:
        return True
    if isinstance(obj, (tuple, list)):
        return any(_mentions(o, module, seen) for o in obj)
    if isinstance(obj, dict):
        return any(_mentions(o, module, seen) for o in obj.values())
    if isinstance(obj, functools.partial):
        return _mentions(obj.func, module, seen) or _mentions(obj.args, module, seen)
    if not isinstance(obj, (types.FunctionType, type)) or getattr(obj, "__module__", None) != module.__name__:
        return False
    if isinstance(obj, types.FunctionType):
        cells = [c.cell_contents for name, c in zip(obj.__code__.co_freevars, obj.__closure__ or ())
                 if name != "__class__" and _filled(c)]  # absl's parameters; not super()'s class
        if any(_mentions(o, module, seen) for o in cells):
            return True
        if NAMED.search(_source(obj)):
            return True
        return any(_mentions(vars(module)[n], module, seen) for n in _names(obj.__code__) if n in vars(module))
    return bool(NAMED.search(_source(obj)))


def _source(obj):
    """obj's source from its ``def``/``class`` line on (a decorator's parameters belong to one case)."""
    try:
        lines = inspect.getsource(obj).splitlines()
    except (OSError, TypeError):
        return ""
    start = next((i for i, line in enumerate(lines) if line.lstrip().startswith(("def ", "async def ", "class "))), 0)
    return "\n".join(lines[start:])


def _filled(cell):
    try:
        return cell.cell_contents is not _MISSING  # an empty cell raises
    except ValueError:
        return False


def _names(code):
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names(const)
    return names


def _selected(item):
    module = item.module
    fn = getattr(item, "obj", None)
    if fn is None or module is None:
        return False
    seen = set()
    if _mentions(getattr(fn, "__func__", fn), module, seen):
        return True
    cls = getattr(item, "cls", None)
    return cls is not None and any(_mentions(vars(cls)[m], module, seen)
                                   for m in ("setUp", "setUpClass") if m in vars(cls))


_chosen = set()
ALL = os.environ.get("BNREF_SELECT") == "all"  # run every test; report those that built one unselected


def pytest_collection_modifyitems(config, items):
    keep = [i for i in items if _selected(i)]
    _chosen.update(i.nodeid for i in keep)
    if not ALL:
        config.hook.pytest_deselected(items=[i for i in items if i not in keep])
        items[:] = keep


_none_built = []
_unselected_built = []


_before = {}


def pytest_runtest_setup(item):
    _before[item.nodeid] = built["n"]


def pytest_runtest_logreport(report):
    if report.when != "call" or report.skipped:
        return
    n = built["n"] - _before.get(report.nodeid, built["n"])
    if n == 0 and report.nodeid in _chosen:
        _none_built.append(report.nodeid)
    if n and report.nodeid not in _chosen:
        _unselected_built.append(report.nodeid)


def pytest_terminal_summary(terminalreporter):
    where = f"{BN.__module__}.{BN.__qualname__}"
    terminalreporter.write_line(f"BatchNorm under test: {where}; {len(_none_built)} selected test(s) built none")
    for nodeid in _none_built:
        terminalreporter.write_line(f"  built none: {nodeid}")
    if ALL:
        terminalreporter.write_line(f"{len(_unselected_built)} unselected test(s) built one")
        for nodeid in _unselected_built:
            terminalreporter.write_line(f"  built one, not selected: {nodeid}")
