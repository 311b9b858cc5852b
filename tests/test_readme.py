"""README and docs cannot drift from the code.

- The conventions table is generated from the presets, and .ci/run runs exactly the README's
  test command.
- Every ```python block in README.md and docs/*.md runs as written (one test per block, named
  ``FILE#N``, N counting that file's python blocks from 1), in a fresh namespace: a block is
  self-contained, so a reader can copy any one of them alone.
- What a block prints is checked. The convention: a ```python block followed by a ```text
  block, with nothing but blank lines between the two fences' lines, must print exactly that
  text to stdout. Both are compared line by line after trailing whitespace is removed from each
  line and trailing blank lines are dropped; nothing else is forgiven, there is no numeric
  tolerance. A block that prints floating-point numbers rounds them (``f"{v:.3f}"``,
  ``.round(4)``) to digits that do not depend on the platform, and asserts what it claims.
  A python block with no ```text block after it may print anything.
- Every docs/*.md page is linked from the README, and the relative links to Markdown and
  Python files in the README and the docs resolve.
"""

import contextlib
import io
import pathlib
import re

import pytest

from bnref.parity import conventions_table

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
DOC_PAGES = sorted((ROOT / "docs").glob("*.md"))
PAGES = [ROOT / "README.md", *DOC_PAGES]


def test_conventions_table_is_generated_from_the_presets():
    block = re.search(r"<!-- conventions-table:.*?-->\n(.*?)\n<!-- /conventions-table -->", README, re.S)
    assert block, "README lacks the conventions-table markers"
    assert block.group(1) == conventions_table(), "run `python -m bnref.parity --conventions-table` and paste it"


def _bash_blocks(text):
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, re.S)]


def test_ci_runs_the_readme_test_command():
    quick_start = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = _bash_blocks(quick_start)
    assert len(commands) == 2, "the quick start has exactly two commands: main job, tests"
    test_command = commands[1]
    assert "pytest" in test_command
    ci_lines = [l.strip() for l in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines, ".ci/run must run README's test command verbatim"
    assert "bnref.train" in commands[0]


# A fenced block: a line starting with ``` and an info string (its first word is the language),
# the body, and a closing line of ``` alone. Fences start at the beginning of a line.
_FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.M | re.S)


def python_blocks(text):
    """``[(code, expected_stdout or None)]`` for each ```python block of a Markdown text, in order;
    ``expected_stdout`` is the body of a ```text block that follows with only blank lines between."""
    fences = [(m.group(1).split()[0] if m.group(1).split() else "", m.group(2), m.start(), m.end())
              for m in _FENCE.finditer(text)]  # fmt: skip
    blocks = []
    for i, (lang, body, _, end) in enumerate(fences):
        if lang != "python":
            continue
        expected = None
        if i + 1 < len(fences):
            next_lang, next_body, next_start, _ = fences[i + 1]
            if next_lang == "text" and not text[end:next_start].strip():
                expected = next_body
        blocks.append((body, expected))
    return blocks


def _normalized(out):
    lines = [line.rstrip() for line in out.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def _block_cases():
    cases = []
    for page in PAGES:
        name = page.relative_to(ROOT).as_posix()
        for n, (code, expected) in enumerate(python_blocks(page.read_text()), start=1):
            cases.append(pytest.param(name, code, expected, id=f"{name}#{n}"))
    return cases


def test_the_block_parser_pairs_output_with_its_block():
    text = "```python\nprint(1)\n```\n\n```text\n1\n```\nprose\n```python\npass\n```\nprose\n```text\nx\n```\n"
    assert python_blocks(text) == [("print(1)\n", "1\n"), ("pass\n", None)]


def test_readme_has_python_blocks():
    assert len(python_blocks(README)) >= 5


@pytest.mark.parametrize("page, code, expected", _block_cases())
def test_every_python_block_runs_as_written(page, code, expected):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, page, "exec"), {"__name__": "__main__"})
    if expected is not None:
        assert _normalized(out.getvalue()) == _normalized(expected), f"{page}: the block's output differs from its text block"


def test_every_docs_page_is_linked_from_the_readme():
    for page in DOC_PAGES:
        target = page.relative_to(ROOT).as_posix()
        assert f"]({target}" in README, f"README.md does not link {target}"


_LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_to_pages_and_code_resolve(page):
    for target in _LINK.findall(page.read_text()):
        path = target.split("#", 1)[0]
        if "://" in target or not path.endswith((".md", ".py")):
            continue
        assert (page.parent / path).exists(), f"{page.name} links {target}, which does not exist"


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation but hyphens and
    underscores dropped, spaces to hyphens (``## Data parallelism`` -> ``data-parallelism``)."""
    text = re.sub(r"`([^`]*)`", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(text: str) -> set:
    seen, out = {}, set()
    body = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)  # no headings inside code blocks
    for m in re.finditer(r"^#{1,6} (.+?)\s*$", body, flags=re.M):
        slug = github_anchor(m.group(1))
        n = seen.get(slug, 0)
        out.add(slug if n == 0 else f"{slug}-{n}")  # repeats get -1, -2, ...
        seen[slug] = n + 1
    return out


def test_github_anchor_follows_githubs_rule():
    assert github_anchor("Data parallelism") == "data-parallelism"
    assert github_anchor("bn-vs-none: does BN converge faster?") == "bn-vs-none-does-bn-converge-faster"
    assert github_anchor("Moving weights: `bnref.convert`") == "moving-weights-bnrefconvert"
    assert _anchors("# A\n## A\n```\n# not a heading\n```\n") == {"a", "a-1"}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_anchor_link_resolves(page):
    """At b02e4a9 the README linked #data-parallelism, a heading it did not have."""
    for target in _LINK.findall(page.read_text()):
        if "://" in target or "#" not in target:
            continue
        path, anchor = target.split("#", 1)
        linked = page if not path else page.parent / path
        if linked.suffix != ".md":
            continue
        assert anchor in _anchors(linked.read_text()), f"{page.name} links {target}: {linked.name} has no such heading"
