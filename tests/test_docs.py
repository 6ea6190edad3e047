"""The README and docs/ say what runs: every Python block runs here on the demo checkpoint or is marked with what it
needs; every command that calls one of the project's scripts parses with that script's own parser; every make target
named exists; every relative link points at a file; the model card stays short."""

import contextlib
import io
import os
import re

import pytest

from tests.conftest import ROOT
from tests.utils.docs import (
    MARKS,
    PAGES,
    all_blocks,
    blocks,
    commands_in_shell,
    inline_commands,
    make_targets,
    parse_only,
    script_and_arguments,
)

PYTHON_BLOCKS = [block for block in all_blocks() if block.language == "python"]
SHELL_BLOCKS = [block for block in all_blocks() if block.language in ("bash", "sh", "shell")]
COMMANDS = [(f"{block}: {' '.join(words)}", words) for block in SHELL_BLOCKS for words in commands_in_shell(block.code)]
COMMANDS += [
    (f"{page.relative_to(ROOT)} (inline): {' '.join(words)}", words)
    for page in PAGES
    for words in inline_commands(page)
]
SCRIPT_COMMANDS = [(name, script_and_arguments(words)) for name, words in COMMANDS if script_and_arguments(words)]


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=str)
def test_every_python_block_compiles_and_is_marked_runnable_or_says_what_it_needs(block):
    assert block.mark in MARKS, f"{block}: mark it `runnable` (and make it run on the demo) or one of {MARKS[1:]}"
    compile(block.code, str(block), "exec")


@pytest.mark.parametrize(
    "page", [p for p in PAGES if any(b.mark == "runnable" for b in blocks(p))], ids=lambda p: str(p.relative_to(ROOT))
)
def test_runnable_blocks_run_as_written_and_print_what_their_comments_say(page, monkeypatch):
    """The page's runnable blocks in order, in one namespace, from the repository root (as a reader runs them). A
    `print(...)  # text` line must print that text."""
    monkeypatch.chdir(ROOT)
    namespace: dict = {}
    for block in blocks(page):
        if block.mark != "runnable":
            continue
        output = io.StringIO()
        with contextlib.redirect_stdout(output):
            exec(compile(block.code, str(block), "exec"), namespace)
        prints = re.findall(r"^\s*print\(.*$", block.code, flags=re.MULTILINE)
        expected = [re.search(r"\)\s+# (.+)$", line) for line in prints]
        if prints and all(expected):
            printed = [line.strip() for line in output.getvalue().strip().splitlines()]
            assert printed == [m.group(1) for m in expected], f"{block} printed {printed}"


@pytest.mark.parametrize("name,command", SCRIPT_COMMANDS, ids=[name for name, _ in SCRIPT_COMMANDS])
def test_documented_commands_parse_with_the_script_s_own_parser(name, command):
    script, arguments = command
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    try:
        unknown = parse_only(script, arguments)
    except SystemExit as exit:  # argparse's own error (message on stderr): a bad value or a missing option
        pytest.fail(f"{name}: {script.name} refused these arguments (exit status {exit.code})")
    assert not unknown, f"{name}: {script.name} does not know {unknown}"


def test_documented_make_targets_exist():
    targets = make_targets()
    named = {words[1] for _, words in COMMANDS if words[0] == "make" and len(words) > 1}
    named |= {target for page in PAGES for target in re.findall(r"`make ([\w-]+)`", page.read_text())}
    assert named and named <= targets, f"not in the Makefile: {sorted(named - targets)}"


def test_relative_links_point_at_files():
    missing = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            if not (page.parent / target.split("#")[0]).exists():
                missing.append(f"{page.relative_to(ROOT)} → {target}")
    assert not missing, missing


def test_the_model_card_is_short_and_reaches_every_page_in_one_click():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) < 12 * 1024, f"README.md is {len(readme.encode())} bytes"
    linked = set(re.findall(r"\]\(docs/([\w-]+\.md)", readme))
    pages = {page.name for page in (ROOT / "docs").glob("*.md")}
    assert pages <= linked, f"docs pages the README does not link: {sorted(pages - linked)}"


def test_each_docs_page_opens_with_what_it_covers():
    for page in sorted((ROOT / "docs").glob("*.md")):
        lines = page.read_text().splitlines()
        assert lines[0].startswith("# ") and lines[1] == "" and lines[2] and not lines[2].startswith(("#", "`", "|"))
