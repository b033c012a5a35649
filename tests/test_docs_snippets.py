"""Every code block a user would paste from README.md and docs/*.md runs (issue 17).

The ```bash / ```sh / ```python blocks are extracted and run against a live server: the
default address (127.0.0.1:11434) in a block is replaced by the test server's, and
SHOAL_HOST / OLLAMA_HOST point at it. A block that needs something absent (a peer server, a
registry, minutes of benchmarking, a server that never exits) is marked in the document by
an HTML comment on the line before its fence, and is reported here as skipped with that reason:

    <!-- no-run: needs llama.cpp serving on :8081 -->
    ```bash
    ...

Other languages (json, toml) are data, not commands, and are not run.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUNNABLE = {"bash": "bash", "sh": "bash", "shell": "bash", "console": "bash", "python": "python",
            "py": "python"}
NO_RUN = re.compile(r"<!--\s*no-run:\s*(.*?)\s*-->")
DEFAULT_ADDRESS = "127.0.0.1:11434"


@dataclass(frozen=True)
class Block:
    document: str
    line: int              # of the opening fence
    language: str          # "bash" or "python"
    code: str
    skip: str | None       # the no-run reason, if marked


def extract_blocks(text: str, document: str) -> list[Block]:
    """The fenced blocks of one Markdown text (``` or ~~~, any indent up to 3 spaces)."""
    blocks = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        opening = re.match(r"^ {0,3}(`{3,}|~{3,})\s*([\w+-]*)", lines[i])
        if not opening:
            i += 1
            continue
        fence, language = opening.group(1), opening.group(2).lower()
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines) and not re.match(rf"^ {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}\s*$", lines[i]):
            body.append(lines[i])
            i += 1
        i += 1   # past the closing fence (or the end of an unclosed block)
        previous = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        marker = NO_RUN.search(previous)
        if language in RUNNABLE:
            blocks.append(Block(document, start + 1, RUNNABLE[language], "\n".join(body) + "\n",
                                marker.group(1) if marker else None))
    return blocks


def all_blocks() -> list[Block]:
    return [block for path in DOCUMENTS
            for block in extract_blocks(path.read_text(), str(path.relative_to(ROOT)))]


def test_the_extractor_finds_blocks_and_markers() -> None:
    text = ("Intro\n\n```bash\necho one\n```\n\n<!-- no-run: needs a GPU -->\n\n~~~python\n"
            "print(2)\n~~~\n\n```json\n{}\n```\n````bash\n```\nnested\n````\n")
    blocks = extract_blocks(text, "x.md")
    assert [(b.line, b.language, b.code, b.skip) for b in blocks] == [
        (3, "bash", "echo one\n", None), (9, "python", "print(2)\n", "needs a GPU"),
        (16, "bash", "```\nnested\n", None)]


@pytest.mark.parametrize("block", all_blocks(), ids=lambda b: f"{b.document}:{b.line}")
def test_a_documented_block_runs(block: Block, shoal_server, tmp_path) -> None:
    if block.skip:
        pytest.skip(block.skip)
    address = shoal_server.url.removeprefix("http://")
    code = block.code.replace(DEFAULT_ADDRESS, address)
    env = {**os.environ, "SHOAL_HOST": address, "OLLAMA_HOST": shoal_server.url,
           "SHOAL_NO_AUTOSTART": "1", "SHOAL_HOME": str(tmp_path / "home"), "TERM": "dumb"}
    # what a block may read from its folder, as a user's would have it
    (tmp_path / "notes.txt").write_text("Shoal serves language models. It speaks two dialects.\n")
    command = ["bash", "-e", "-o", "pipefail", "-c", code] if block.language == "bash" \
        else [sys.executable, "-c", code]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, f"{block.document}:{block.line}\n{code}\n{result.stderr[-3000:]}"
    assert result.stdout.strip(), f"{block.document}:{block.line} printed nothing\n{result.stderr[-2000:]}"
