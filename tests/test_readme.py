"""README and CI cannot drift from the code: the conventions table is generated from the
presets, and .ci/run runs exactly the README's test command."""

import pathlib
import re

import pytest

from bnref.parity import conventions_table

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


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


PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_every_python_block_runs_as_written(index):
    exec(compile(PYTHON_BLOCKS[index], f"README.md python block {index + 1}", "exec"), {})
