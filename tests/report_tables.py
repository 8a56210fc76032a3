"""Reading the tables of a Markdown report back, for tests that recompute every cell."""

from __future__ import annotations

import re


def section(md: str, title: str) -> str:
    """The body of the ``## title`` section of a Markdown report."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |^---$)", md, re.MULTILINE | re.DOTALL)
    assert match, f"section {title!r} not in the report"
    return match.group(1)


def _unescape(cell: str) -> str:
    return (
        cell.replace("\\|", "|").replace("\\\\", "\\").replace("<br>", "\n").replace("&lt;", "<").replace("&gt;", ">")
    )


def md_tables(text: str) -> list[list[list[str]]]:
    """Tables of a Markdown text as lists of rows of cells (header first, separator dropped, cells unescaped)."""
    tables: list[list[list[str]]] = []
    current: list[list[str]] = []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            cells = [_unescape(c.strip()) for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            if not all(re.fullmatch(r"-+:?", c) for c in cells):
                current.append(cells)
        elif current:
            tables.append(current)
            current = []
    return tables
