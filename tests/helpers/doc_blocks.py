"""The fenced command blocks of README.md and docs/*.md, with the HTML comments that steer them.

Read by tests/docs/test_doc_commands.py, which runs every block, and by the tests that run a block themselves
because they must check what it wrote (tests/deploy/test_served_model.py: the guidellm and aiperf commands).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from tests.helpers.server_process import REPO_ROOT

DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
COMMAND_LANGUAGES = {"bash", "sh", "shell"}
PLACEHOLDER_URL = "http://127.0.0.1:8000"
_FENCE = re.compile(r"^```(\S*)\s*$")
_COMMENT = re.compile(r"^<!--\s*(not-run|expect):\s*(.*?)\s*-->$")


@dataclass
class Block:
    doc: str  # path relative to the repository
    line: int  # of the opening fence, 1-based
    language: str
    text: str
    not_run: str | None  # the reason, when marked
    expect: list[str]

    @property
    def first_command(self) -> str:
        return next(line.strip() for line in self.text.splitlines() if line.strip())


def blocks_of(path: Path) -> list[Block]:
    """The fenced blocks of a markdown file, each with the not-run / expect comments right before it."""
    lines = path.read_text().splitlines()
    found, i = [], 0
    marks: list[tuple[str, str]] = []
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        comment = _COMMENT.match(lines[i].strip())
        if comment:
            marks.append((comment.group(1), comment.group(2)))
        elif opening:
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            not_run = [why for kind, why in marks if kind == "not-run"]
            found.append(Block(str(path.relative_to(REPO_ROOT)), i + 1, opening.group(1).lower(),
                               "\n".join(lines[i + 1:end]) + "\n", not_run[0] if not_run else None,
                               [text for kind, text in marks if kind == "expect"]))
            marks, i = [], end
        elif lines[i].strip():
            marks = []  # a comment steers only the block right after it
        i += 1
    return found


def command_blocks(path: Path) -> list[Block]:
    return [b for b in blocks_of(path) if b.language in COMMAND_LANGUAGES]


def block_starting(doc: str, command: str) -> Block:
    """The one command block of ``doc`` (relative to the repository) whose first command starts so."""
    [block] = [b for b in command_blocks(REPO_ROOT / doc) if b.first_command.startswith(command)]
    return block
