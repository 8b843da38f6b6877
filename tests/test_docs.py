"""The README, the docs and the notebooks cannot drift from the kit: every command they show must parse, every
link they hold must resolve."""

from __future__ import annotations

import ast
import importlib
import re
import shlex

import nbformat
import pytest

from conftest import ROOT

COMMAND = re.compile(r"python -m (kit(?:\.\w+)?)([^\n|;&#]*)")


def commands_in(text: str) -> list[tuple[str, list[str]]]:
    found = []
    for module, rest in COMMAND.findall(text):
        rest = re.sub(r"\$\{?\w+\}?", "X", rest.strip())  # shell variables stand for values
        found.append((module, shlex.split(rest)))
    return found


def assert_parses(module: str, args: list[str]) -> None:
    target = "kit.__main__" if module == "kit" else module
    parser = importlib.import_module(target).build_parser()
    try:
        parser.parse_args(args)
    except SystemExit as error:
        if error.code == 0:  # --help
            return
        pytest.fail(f"'python -m {module} {' '.join(args)}' is rejected by the kit's parser ({error})")


PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def code_blocks(path=ROOT / "README.md") -> str:
    blocks = re.findall(r"```(\w*)\n(.*?)```", path.read_text(), re.S)
    return "\n".join(code for language, code in blocks if language in ("", "bash", "sh", "shell", "console"))


def test_readme_commands_parse():
    commands = commands_in(code_blocks())
    assert len(commands) >= 10
    for module, args in commands:
        assert_parses(module, args)
    for essential in ("kit.stage --step 5 --resume", "kit --smoke", "kaggle competitions submit", "kit.demo --share"):
        assert essential in code_blocks()


@pytest.mark.parametrize("page", PAGES[1:], ids=lambda p: p.name)
def test_each_page_starts_with_commands_that_parse(page):
    """A docs page opens with its commands (the first code block before any section), and every one parses."""
    text = page.read_text()
    assert text.index("```") < text.index("\n## ") if "\n## " in text else "```" in text, "commands first"
    for module, args in commands_in(code_blocks(page)):
        assert_parses(module, args)


def test_the_readme_stays_short_and_links_every_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    linked = {target for target in LINK.findall(readme) if target.startswith("docs/")}
    assert linked >= {f"docs/{page.name}" for page in PAGES[1:] if page.name != "README.md"}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a web address, or an anchor on the same page
        path = (page.parent / target.split("#")[0]).resolve()
        assert path.exists(), f"{page.name} links to {target}, which is not there"


def test_readme_test_set_up_is_what_ci_runs():
    """The same install (requirements-test.txt, JAX included) and the same test command as CI's."""
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    block = re.search(r"To run the tests.*?```bash\n(.*?)```", readme, re.S).group(1)
    lines = [line.split("#")[0].strip() for line in block.splitlines()]
    assert lines[0] == "pip install -r requirements-test.txt" and "python -m pip install -q -r requirements-test.txt" in ci
    assert lines[1] == "python -m pytest" and "python -m pytest" in ci
    assert "jax" in (ROOT / "requirements-test.txt").read_text()


def helper_calls(code: str) -> list[tuple[str, list[str]]]:
    """The notebooks' kit('kit.stage', '--all', ...) calls as (module, args); a variable stands for a value."""
    found = []
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "kit":
            words = [a.value if isinstance(a, ast.Constant) else "X" for a in node.args]
            found.append((words[0], words[1:]))
    return found


@pytest.mark.parametrize("name", ["colab.ipynb", "kaggle.ipynb"])
def test_notebook_is_valid_and_its_commands_parse(name):
    notebook = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(not cell.get("outputs") and cell.get("execution_count") is None for cell in code), "no outputs saved"
    python = "\n".join(line for cell in code for line in cell.source.splitlines() if not line.startswith(("!", "%")))
    commands = helper_calls(python)
    assert len(commands) >= 5
    for module, args in commands:
        assert_parses(module, args)
    text = "\n".join(cell.source for cell in code)
    assert not re.search(r"KAGGLE_\w+['\"]\]\s*=\s*['\"]", text), "credentials are never written into a notebook"


def test_readme_says_what_a_hard_kill_loses():
    """The first paragraph's promise follows the checkpoint interval, and the precision rule is Keras' own."""
    from kit.devices import precision_for
    from kit.timer import SAVE_INTERVAL_S

    readme = " ".join((ROOT / "README.md").read_text().split())
    stages = " ".join((ROOT / "docs" / "stages.md").read_text().split())
    assert SAVE_INTERVAL_S == 600 and "loses the batches since the last checkpoint, at most about ten minutes" in readme
    assert precision_for(6.0) == "float32" and "float32 below (Kaggle's P100" in stages
