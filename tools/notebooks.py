"""bnref's notebooks (``notebooks/*.ipynb``): run them, keep them stripped, render them into docs.

    python tools/notebooks.py run [--quick] NOTEBOOK...      # execute top to bottom, report each wall time
    python tools/notebooks.py render NOTEBOOK...             # the full run -> docs/learn/NAME.md (+ NAME_files/)
    python tools/notebooks.py strip NOTEBOOK...              # remove outputs and execution counts, in place
    python tools/notebooks.py check NOTEBOOK...              # exit 1 naming any notebook that is not stripped

A notebook reads two switches in its first code cell, from the environment (so the same file
runs in Jupyter, in the tests and here): ``BNREF_NOTEBOOK_QUICK=1`` (little data, few steps: what
the tests run, seconds) and ``BNREF_NOTEBOOK_SYNTHETIC=1`` (the synthetic stand-in instead of
Fashion-MNIST; the tests set it only where Fashion-MNIST is not installed, and every notebook
prints which data it uses). It runs in a fresh temporary working directory, so whatever it
writes never lands in the repository.

In git a notebook holds no outputs (``strip``; ``tests/test_notebooks.py`` checks it). What a
full run prints and draws is in its rendered page, ``docs/learn/NAME.md``: its Markdown cells as
they are, each code cell as a ```python block, the cell's printed output as a ```text block and
its figures as PNG files beside the page; the page's header names the commit, the machine and
the wall time of the run it shows. The tests check that the page's code is the notebook's code,
cell for cell, so a page cannot show code the notebook no longer has.

Needs nbclient, nbformat and ipykernel (the ``notebooks`` extra; ``test`` includes it).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import pathlib
import platform
import re
import subprocess
import sys
import tempfile
import time
from typing import Dict, Iterator, List, Optional, Tuple

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
RENDERED = ROOT / "docs" / "learn"
QUICK_ENV, SYNTHETIC_ENV = "BNREF_NOTEBOOK_QUICK", "BNREF_NOTEBOOK_SYNTHETIC"
#: the first code cell of every notebook begins with these lines (the two switches)
FIRST_CELL = (
    "import os\n"
    "\n"
    f'QUICK = os.environ.get("{QUICK_ENV}") == "1"  # the tests run every notebook so: little data, few steps\n'
    f'SYNTHETIC = os.environ.get("{SYNTHETIC_ENV}") == "1"  # the tests set it only where Fashion-MNIST is not installed\n'
)
HEADER = "<!-- rendered from {source} by `python tools/notebooks.py render`: edit the notebook, then render again -->"


def notebooks() -> List[pathlib.Path]:
    return sorted(NOTEBOOKS.glob("*.ipynb"))


def read(path) -> "nbformat.NotebookNode":  # noqa: F821 (nbformat is imported here, not at the top)
    import nbformat

    return nbformat.read(os.fspath(path), as_version=4)


@contextlib.contextmanager
def _environment(**values: Optional[str]) -> Iterator[None]:
    """Set (or, for None, remove) environment variables for the kernel the block starts; put back after."""
    old = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        yield
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def execute(path, *, quick: bool, synthetic: bool = False, cwd=None, timeout: int = 900):
    """Run the notebook at ``path`` top to bottom in a fresh ``python3`` kernel, in ``cwd`` (a new
    temporary directory if None); returns ``(executed notebook, wall seconds)``. A cell that raises
    raises ``nbclient.exceptions.CellExecutionError`` naming the cell and the error."""
    import nbclient

    nb = read(path)
    with contextlib.ExitStack() as stack:
        if cwd is None:
            cwd = stack.enter_context(tempfile.TemporaryDirectory(prefix="bnref-notebook-"))
        # JUPYTER_PLATFORM_DIRS: jupyter_core's own future default, which also silences its warning about it
        stack.enter_context(_environment(**{QUICK_ENV: "1" if quick else None, SYNTHETIC_ENV: "1" if synthetic else None,
                                            "JUPYTER_PLATFORM_DIRS": "1", "MPLBACKEND": None}))  # fmt: skip
        client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=timeout,
                                         resources={"metadata": {"path": os.fspath(cwd)}})  # fmt: skip
        started = time.perf_counter()
        client.execute()
        return nb, time.perf_counter() - started


def unstripped(nb) -> List[str]:
    """What keeps ``nb`` from being stripped: code cells with outputs or execution counts."""
    problems = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and (cell.get("outputs") or cell.get("execution_count") is not None):
            problems.append(f"cell {i} has outputs or an execution count")
    return problems


def strip(nb):
    """``nb`` without outputs, execution counts or per-cell execution metadata (in place; returned)."""
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
            cell.metadata.pop("execution", None)
    return nb


def code_cells(nb) -> List[str]:
    return [cell.source for cell in nb.cells if cell.cell_type == "code"]


def _output_text(output) -> str:
    if output.output_type == "stream":
        return output.text
    if output.output_type in ("execute_result", "display_data") and "image/png" not in output.get("data", {}):
        return output.get("data", {}).get("text/plain", "") + "\n"
    if output.output_type == "error":
        return "\n".join(output.traceback) + "\n"
    return ""


_MD_LINK = re.compile(r"(\]\()([^)\s]+)(\))")


def page_markdown(source: str, out_dir=RENDERED) -> str:
    """A Markdown cell as its rendered page shows it: relative links, written from ``notebooks/``,
    rewritten to reach the same files from ``out_dir``; a link to another notebook goes to that
    notebook's rendered page."""

    def rewrite(m):
        target = m.group(2)
        if "://" in target or target.startswith(("#", "mailto:")):
            return m.group(0)
        path, _, anchor = target.partition("#")
        resolved = (NOTEBOOKS / path).resolve()
        if resolved.suffix == ".ipynb" and resolved.parent == NOTEBOOKS:
            resolved = pathlib.Path(out_dir).resolve() / f"{resolved.stem}.md"
        new = os.path.relpath(resolved, pathlib.Path(out_dir).resolve()) + (f"#{anchor}" if anchor else "")
        return m.group(1) + new + m.group(3)

    return _MD_LINK.sub(rewrite, source.strip())


def render(nb, name: str, header: Dict[str, str], out_dir=RENDERED) -> Tuple[pathlib.Path, List[pathlib.Path]]:
    """Write the executed ``nb`` as ``out_dir/NAME.md`` with its figures in ``out_dir/NAME_files/``
    (old figures of that notebook removed first); returns the page and the figures."""
    out_dir = pathlib.Path(out_dir)
    figures_dir = out_dir / f"{name}_files"
    figures_dir.mkdir(parents=True, exist_ok=True)
    for old in figures_dir.glob("*.png"):
        old.unlink()
    parts = [HEADER.format(source=f"notebooks/{name}.ipynb"),
             f"\n*The full run of [notebooks/{name}.ipynb](../../notebooks/{name}.ipynb): " + ", ".join(
                 f"{k} {v}" for k, v in header.items()) + ".*\n"]  # fmt: skip
    figures: List[pathlib.Path] = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "markdown":
            parts.append(page_markdown(cell.source, out_dir) + "\n")
            continue
        if cell.cell_type != "code" or not cell.source.strip():
            continue
        parts.append(f"```python\n{cell.source.rstrip()}\n```\n")
        text = "".join(_output_text(o) for o in cell.get("outputs", []))
        if text.strip():
            parts.append(f"```text\n{text.rstrip()}\n```\n")
        for output in cell.get("outputs", []):
            png = output.get("data", {}).get("image/png") if output.output_type in ("display_data", "execute_result") else None
            if png:
                path = figures_dir / f"cell{i}-{len(figures) + 1}.png"
                path.write_bytes(base64.b64decode(png))
                figures.append(path)
                parts.append(f"![cell {i}, figure {len(figures)}]({name}_files/{path.name})\n")
    page = out_dir / f"{name}.md"
    tmp = page.with_suffix(".md.tmp")
    tmp.write_text("\n".join(parts))
    os.replace(tmp, page)  # atomically: a half-written page never replaces a whole one
    return page, figures


def rendered_code(page_text: str) -> List[str]:
    """The ```python blocks of a rendered page, in order (what :func:`render` wrote of each code cell)."""
    return [m.group(1) for m in re.finditer(r"^```python\n(.*?)\n```$", page_text, re.S | re.M)]


def _commit() -> str:
    try:
        head = subprocess.run(["git", "-C", os.fspath(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "-C", os.fspath(ROOT), "status", "--porcelain", "--", "bnref", "notebooks"],
                               capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
        return head + (" with uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _machine() -> str:
    return f"{platform.machine()} CPU, {os.cpu_count()} cores" + (", synthetic data" if os.environ.get(SYNTHETIC_ENV) else "")


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python tools/notebooks.py", description=__doc__.splitlines()[0])
    p.add_argument("command", choices=("run", "render", "strip", "check"))
    p.add_argument("notebooks", nargs="*", help="default: every notebooks/*.ipynb")
    p.add_argument("--quick", action="store_true", help="run: with BNREF_NOTEBOOK_QUICK=1 (what the tests run)")
    args = p.parse_intermixed_args(argv)
    paths = [pathlib.Path(n) for n in args.notebooks] or notebooks()
    for path in paths:
        if not path.is_file() or path.suffix != ".ipynb":
            p.error(f"{path}: no such notebook (a .ipynb file goes here)")
    if args.command == "check":
        bad = [f"{path}: {problem}" for path in paths for problem in unstripped(read(path))]
        print("\n".join(bad) or f"{len(paths)} notebook(s) stripped")
        return 1 if bad else 0
    if args.command == "strip":
        import nbformat

        for path in paths:
            nbformat.write(strip(read(path)), os.fspath(path))
        return 0
    if args.quick and args.command != "run":
        p.error("--quick is for run: a rendered page shows the full run")
    for path in paths:
        print(f"{path.name}: running ({'quick' if args.quick else 'full'})...", flush=True)
        nb, seconds = execute(path, quick=args.quick)
        print(f"{path.name}: ran in {seconds:.1f} s", flush=True)
        if args.command == "render":
            page, figures = render(nb, path.stem, {"at": _commit(), "on": _machine(), "wall time": f"{seconds:.0f} s"})
            print(f"wrote {page.relative_to(ROOT)} and {len(figures)} figure(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
