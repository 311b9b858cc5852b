"""The notebooks (``notebooks/*.ipynb``): every one runs top to bottom in a fresh kernel with its
quick switch (the claims its cells assert included), is stripped of outputs in git, and has a
rendered page in ``docs/learn/`` that shows its code, cell for cell (``tools/notebooks.py``)."""

import json
import re

import nbformat
import pytest
from nbclient.exceptions import CellExecutionError

from bnref import data
from tools import notebooks

NOTEBOOKS = notebooks.notebooks()
#: the real Fashion-MNIST when it is installed (as in CI), else the synthetic stand-in, asked for explicitly
SYNTHETIC = data.find_data_dir() is None
IDS = [p.stem for p in NOTEBOOKS]


def test_the_learners_notebooks_are_there():
    assert {"batch-norm-chapter", "porting-bug", "precise-bn"} <= set(IDS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_the_notebook_runs_top_to_bottom(path, tmp_path):
    nb, seconds = notebooks.execute(path, quick=True, synthetic=SYNTHETIC, cwd=tmp_path)
    print(f"{path.name}: {seconds:.1f} s (quick, {'synthetic data' if SYNTHETIC else 'Fashion-MNIST'})")
    errors = [o for cell in nb.cells for o in cell.get("outputs", []) if o.output_type == "error"]
    assert not errors
    printed = "".join(o.get("text", "") for cell in nb.cells for o in cell.get("outputs", []) if o.output_type == "stream")
    assert ("synthetic" in printed.lower()) == SYNTHETIC, "a notebook prints which data it uses"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_the_notebook_is_stripped_and_reads_the_two_switches(path):
    nb = notebooks.read(path)
    nbformat.validate(nb)
    assert not notebooks.unstripped(nb), f"run `python tools/notebooks.py strip {path.relative_to(notebooks.ROOT)}`"
    assert notebooks.code_cells(nb)[0].startswith(notebooks.FIRST_CELL)
    assert nb.metadata["kernelspec"]["name"] == "python3"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_the_rendered_page_shows_the_notebooks_code_and_its_figures(path):
    page = notebooks.RENDERED / f"{path.stem}.md"
    assert page.is_file(), f"run `python tools/notebooks.py render {path.relative_to(notebooks.ROOT)}`"
    text = page.read_text()
    nb = notebooks.read(path)
    code = [c.rstrip() for c in notebooks.code_cells(nb) if c.strip()]
    assert notebooks.rendered_code(text) == code, f"{page.name} shows other code than {path.name}: render it again"
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            assert notebooks.page_markdown(cell.source) in text, f"{page.name} lacks a Markdown cell of {path.name}: render it again"
    assert "full run" in text and " at " in text  # the header: which run, which commit, which machine
    for target in re.findall(r"!\[[^]]*\]\(([^)]+)\)", text):
        assert (page.parent / target).is_file(), f"{page.name} shows {target}, which does not exist"
    for target in re.findall(r"\]\(([^)\s]+)\)", text):  # every relative link of the page reaches its file
        if "://" not in target and not target.startswith("#"):
            assert (page.parent / target.split("#")[0]).exists(), f"{page.name} links {target}, which does not exist"


def test_a_page_s_links_reach_from_docs_learn_what_the_notebook_s_reach_from_notebooks():
    cell = "[spec](../bnref/spec.py), [twin](porting-bug.ipynb#top), [d2l](https://d2l.ai/x.html#y), [here](#z)"
    assert notebooks.page_markdown(cell) == ("[spec](../../bnref/spec.py), [twin](porting-bug.md#top), "
                                             "[d2l](https://d2l.ai/x.html#y), [here](#z)")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_every_notebook_and_its_page_are_linked_from_the_readme(path):
    readme = (notebooks.ROOT / "README.md").read_text()
    assert f"](notebooks/{path.name})" in readme and f"](docs/learn/{path.stem}.md" in readme


def _notebook(tmp_path, *sources):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in sources])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = tmp_path / "nb.ipynb"
    nbformat.write(nb, str(path))
    return path


def test_a_cell_whose_claim_fails_fails_the_run(tmp_path):
    path = _notebook(tmp_path, "x = 1", "assert x == 2, 'the claim the text makes'")
    with pytest.raises(CellExecutionError, match="the claim the text makes"):
        notebooks.execute(path, quick=True, cwd=tmp_path)


def test_the_switches_reach_the_kernel_and_it_runs_in_the_given_directory(tmp_path):
    path = _notebook(tmp_path, notebooks.FIRST_CELL + "import pathlib\npathlib.Path('out.json').write_text(repr((QUICK, SYNTHETIC)))")
    notebooks.execute(path, quick=True, synthetic=False, cwd=tmp_path)
    assert (tmp_path / "out.json").read_text() == "(True, False)"
    notebooks.execute(path, quick=False, synthetic=True, cwd=tmp_path)
    assert (tmp_path / "out.json").read_text() == "(False, True)"


def test_render_writes_code_output_and_figures_and_strip_removes_them(tmp_path):
    path = _notebook(tmp_path, "print('hello')", "import matplotlib.pyplot as plt\nplt.plot([1, 2])\nplt.show()")
    nb, _ = notebooks.execute(path, quick=True, cwd=tmp_path)
    nb.cells.insert(0, nbformat.v4.new_markdown_cell("# Title"))
    page, figures = notebooks.render(nb, "nb", {"at": "abc"}, out_dir=tmp_path / "learn")
    text = page.read_text()
    assert "# Title" in text and "```python\nprint('hello')\n```\n\n```text\nhello\n```" in text
    assert notebooks.rendered_code(text) == ["print('hello')", "import matplotlib.pyplot as plt\nplt.plot([1, 2])\nplt.show()"]
    assert len(figures) == 1 and figures[0].read_bytes()[:4] == b"\x89PNG" and f"(nb_files/{figures[0].name})" in text
    assert notebooks.unstripped(nb)
    assert not notebooks.unstripped(notebooks.strip(nb))


def test_check_names_a_notebook_with_outputs(tmp_path, capsys):
    path = _notebook(tmp_path, "print(1)")
    nb = json.loads(path.read_text())
    nb["cells"][0]["outputs"] = [{"output_type": "stream", "name": "stdout", "text": "1\n"}]
    path.write_text(json.dumps(nb))
    assert notebooks.main(["check", str(path)]) == 1
    assert "cell 0 has outputs" in capsys.readouterr().out
    assert notebooks.main(["strip", str(path)]) == 0 and notebooks.main(["check", str(path)]) == 0
