"""The code in the README and docs/: fenced blocks with their marks, and the project's commands found in them.

A fenced block is marked after its language: ```` ```python runnable ```` runs in the test suite on the demo checkpoint;
`needs-gpu`, `needs-weights`, `needs-server` and `needs-vllm` say what else it needs (a server block runs in
test_serving.py against the server it starts, a vLLM block in test_vllm_lvtc.py against `vllm serve`). Every command
in a bash block or an inline code span that calls one of the project's scripts is parsed by that script's own
argument parser.
"""

import argparse
import re
import runpy
import shlex
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "examples" / "README.md"]
MARKS = ("runnable", "needs-gpu", "needs-weights", "needs-server", "needs-vllm")
FENCE = re.compile(r"^```(\w*)[ \t]*([^\n]*)\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
INLINE = re.compile(r"(?<!`)`((?:[A-Z_]+=\S+ )*(?:\.venv/bin/)?(?:python|torchrun|accelerate launch|deepspeed) [^`]+)`")
LAUNCHERS = ("torchrun", "deepspeed")


@dataclass
class Block:
    page: Path
    line: int
    language: str
    mark: str
    code: str

    def __str__(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line} ({self.language} {self.mark})".rstrip()


def blocks(page: Path) -> list[Block]:
    text = page.read_text()
    return [
        Block(page, text[: m.start()].count("\n") + 1, m.group(1), m.group(2).strip(), m.group(3))
        for m in FENCE.finditer(text)
    ]


def all_blocks() -> list[Block]:
    return [block for page in PAGES for block in blocks(page)]


def commands_in_shell(code: str) -> list[list[str]]:
    """The commands of a bash block: continuation lines joined, comments and `[optional]` groups dropped, split at
    `;` and `&&`; `VAR=value` words are taken out and their values put in for later `$VAR`s."""
    commands, variables = [], {}
    for line in code.replace("\\\n", " ").splitlines():
        line = re.sub(r"(^|\s)#.*$", "", line).strip()
        for part in re.split(r";|&&", line):
            words = shlex.split(re.sub(r"\$(\w+)", lambda m: variables.get(m.group(1), m.group(0)), part))
            while words and re.fullmatch(r"[A-Za-z_]+=.*", words[0]):
                name, value = words.pop(0).split("=", 1)
                variables[name] = value
            if words:
                commands.append(words)
    return commands


def inline_commands(page: Path) -> list[list[str]]:
    """Commands quoted in prose; spans that show a syntax (`[...]`, `|`, `...`) rather than a command are left out."""
    spans = [m.group(1).replace("\n", " ") for m in INLINE.finditer(page.read_text())]
    return [commands_in_shell(span)[0] for span in spans if not re.search(r"\[|\||\.\.\.", span)]


def script_and_arguments(words: list[str]) -> tuple[Path, list[str]] | None:
    """The project script a command runs and its arguments, or None for anything else (pip, make, pytest, ...)."""
    if Path(words[0]).name.startswith("python"):
        rest = words[1:]
    elif words[0] in LAUNCHERS or words[:2] == ["accelerate", "launch"]:
        rest = words[2:] if words[0] == "accelerate" else words[1:]
        while rest and not rest[0].endswith(".py"):
            rest = rest[1:]
    else:
        return None
    if not rest or not rest[0].endswith(".py") or not (ROOT / rest[0]).is_file():
        return None
    return ROOT / rest[0], rest[1:]


class Parsed(Exception):
    """Raised in place of running a script once its parser has read the arguments."""

    def __init__(self, unknown: list[str]):
        self.unknown = unknown


def parse_only(script: Path, arguments: list[str]) -> list[str]:
    """Run `script`'s `main(arguments)` up to its argument parsing and return the arguments its parser did not know
    (argparse errors, such as a bad choice or a missing required option, exit with status 2)."""
    parse_known_args = argparse.ArgumentParser.parse_known_args

    def stop_after_parsing(self, args=None, namespace=None):
        _, unknown = parse_known_args(self, args, namespace)
        raise Parsed(unknown)

    argparse.ArgumentParser.parse_known_args = stop_after_parsing
    try:
        runpy.run_path(str(script), run_name="docs_check")["main"](arguments)
    except Parsed as parsed:
        return parsed.unknown
    finally:
        argparse.ArgumentParser.parse_known_args = parse_known_args
    raise AssertionError(f"{script.name}'s main() ran without parsing its arguments")


def make_targets() -> set[str]:
    return set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), flags=re.MULTILINE))
