"""Every command block of README.md and docs/*.md, run as written against a real server: docs that cannot rot.

A fenced block whose language is ``bash``, ``sh`` or ``shell`` is a command block. The blocks of one file
run in order, in one fresh folder per file (``.venv`` there is a link to this test's own environment, so
``.venv/bin/prefix-serve`` is what a fresh clone's ``make install`` gives), against the module's real server
on the embedded default model: ``http://127.0.0.1:8000`` in a block becomes that server's address. Each
block runs under ``bash -euo pipefail`` with ``curl`` failing on an HTTP error status, so any failing step
fails the test. HTML comments right before a block steer it:

- ``<!-- expect: TEXT -->``: the block's output must contain TEXT;
- ``<!-- not-run: why -->``: the block is not run (Docker, a GPU, a second server, ``make`` itself).
  ``NOT_RUN`` below pins those blocks, so a new one fails the suite until it is listed here on purpose.

docs/configuration.md is also checked against the parser of ``server/cli.py``: every flag of every command
has a row there with its default.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from server.cli import build_parser
from tests.helpers.doc_blocks import (
    COMMAND_LANGUAGES,
    DOCS,
    PLACEHOLDER_URL,
    Block,
    blocks_of,
    command_blocks,
)
from tests.helpers.server_process import REPO_ROOT

pytestmark = pytest.mark.slow

# (file, first command of the block) of every block marked not-run; change this list deliberately
NOT_RUN = {
    ("README.md", "make run    # installs into .venv, then serves the embedded SmolLM2-135M-Instruct on http://127.0.0.1:8000"),
    ("docs/benchmarks.md", "make bench"),
    ("docs/benchmarks.md", "make bench-peers"),
    ("docs/benchmarks.md", "make gpu-check"),
    ("docs/benchmarks.md",
     "HF_HUB_OFFLINE=1 .venv/bin/guidellm run --backend kind=openai_http,target=http://127.0.0.1:8000 \\"),
    ("docs/benchmarks.md", "python3 -m venv .venv-aiperf && .venv-aiperf/bin/pip install aiperf==0.13.0"),
    ("docs/benchmarks.md", (".venv-aiperf/bin/aiperf profile --model HuggingFaceTB/SmolLM2-135M-Instruct "
                           "--url http://127.0.0.1:8000 \\")),
    ("docs/operations.md", "docker build -t prefix-serve ."),
    ("docs/operations.md", ".venv/bin/prefix-serve serve --port 8001 --store-dir store-1 --redis-url redis://127.0.0.1:6379/0"),
    ("docs/operations.md", ".venv/bin/prefix-serve serve --port 8001 --auth-file auth.json"),
}
BLOCK_TIMEOUT_S = 600  # training (docs/training.md) on a busy 2-core machine is the slowest block
# Run before every block: curl fails on an HTTP error status (and still prints the error's body).
PRELUDE = 'curl() { command curl --silent --show-error --fail-with-body "$@"; echo; }\n'

def test_the_not_run_blocks_are_exactly_the_listed_ones():
    marked = {(b.doc, b.first_command): b.not_run for path in DOCS for b in command_blocks(path) if b.not_run}
    assert all(marked.values()), "a not-run comment must say why"
    assert set(marked) == NOT_RUN, (
        "not-run blocks changed; run the new block in the suite, or list it in NOT_RUN on purpose:\n"
        f"newly marked: {sorted(set(marked) - NOT_RUN)}\nno longer marked: {sorted(NOT_RUN - set(marked))}")


def test_every_doc_has_commands_or_says_why_not():
    """The parser found the blocks: each file the README links to is read, and most blocks run."""
    assert {p.name for p in DOCS} >= {"README.md", "api.md", "configuration.md", "operations.md", "design.md",
                                      "benchmarks.md"}
    run = [b for path in DOCS for b in command_blocks(path) if not b.not_run]
    assert len(run) >= 10 and len(run) > len(NOT_RUN)
    marked_other = [b for path in DOCS for b in blocks_of(path)
                    if b.language not in COMMAND_LANGUAGES and (b.not_run or b.expect)]
    assert not marked_other, f"a not-run/expect comment before a block that is not bash: {marked_other}"


def _environment(workdir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["HOME"] = env.get("HOME", str(workdir))
    (workdir / ".venv").symlink_to(sys.prefix, target_is_directory=True)
    return env


def runnable(path: Path) -> list[Block]:
    return [b for b in command_blocks(path) if not b.not_run]


@pytest.mark.long  # every block against a real server, training among them: minutes
@pytest.mark.parametrize("doc", [str(p.relative_to(REPO_ROOT)) for p in DOCS if runnable(p)])
def test_the_doc_commands_run_as_written(doc, server, tmp_path):
    blocks = runnable(REPO_ROOT / doc)
    env = _environment(tmp_path)
    for block in blocks:
        script = PRELUDE + block.text.replace(PLACEHOLDER_URL, server.url)
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S, check=False)
        where = f"{doc}:{block.line}"
        assert done.returncode == 0, (f"{where} exited {done.returncode}\n{block.text}\nstdout:\n"
                                      f"{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}")
        for text in block.expect:
            assert text in done.stdout, f"{where}: {text!r} not in its output:\n{done.stdout[-3000:]}"


def _default_cell(action: argparse.Action) -> str:
    """How docs/configuration.md writes a flag's default."""
    if isinstance(action, argparse._StoreTrueAction):
        return "off"
    if action.required:
        return "required"
    if action.default is None:
        return "none"
    if isinstance(action.default, list):
        return "`" + ",".join(map(str, action.default)) + "`"
    return f"`{action.default}`"


def parser_flags() -> dict[str, dict[str, str]]:
    """{command: {--flag: default cell}} from the real parser."""
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {name: {max(a.option_strings, key=len): _default_cell(a) for a in sub._actions
                   if a.option_strings and a.dest != "help"}
            for name, sub in commands.choices.items()}


def documented_flags() -> dict[str, dict[str, str]]:
    """{command: {--flag: default cell}} from the tables of docs/configuration.md."""
    documented: dict[str, dict[str, str]] = {}
    command = None
    for line in (REPO_ROOT / "docs" / "configuration.md").read_text().splitlines():
        heading = re.match(r"^### `prefix-serve (\w+)`", line)
        if heading:
            command = heading.group(1)
            documented[command] = {}
        row = re.match(r"^\| `(--[a-z0-9-]+)` \| (.*?) \|", line)
        if row and command is not None:
            documented[command][row.group(1)] = row.group(2).strip()
    return documented


def test_configuration_lists_every_flag_with_its_default():
    documented = documented_flags()
    for command, flags in parser_flags().items():
        assert command in documented, f"docs/configuration.md has no section for `prefix-serve {command}`"
        for flag, default in flags.items():
            assert flag in documented[command], f"docs/configuration.md: `{command} {flag}` is missing"
            said = documented[command][flag]
            assert said == default, f"docs/configuration.md: `{command} {flag}` says {said}, parser {default}"
        stale = set(documented[command]) - set(flags)
        assert not stale, f"docs/configuration.md documents flags `{command}` no longer has: {sorted(stale)}"


_LINK = re.compile(r"\]\(([^)\s]+)\)")


def _anchors(path: Path) -> set[str]:
    """GitHub's anchors of a markdown file's headings: lower case, punctuation dropped, spaces to hyphens."""
    return {re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
            for line in path.read_text().splitlines() if line.startswith("#")}


def test_every_relative_link_and_anchor_resolves():
    broken = []
    for path in DOCS:
        for target in _LINK.findall(path.read_text()):
            if target.startswith(("http://", "https://")):
                continue
            file_part, _, anchor = target.partition("#")
            linked = (path.parent / file_part).resolve() if file_part else path
            if not linked.exists():
                broken.append(f"{path.name}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
                broken.append(f"{path.name}: {target} (no such heading)")
    assert not broken, broken
