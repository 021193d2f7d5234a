"""Text tables: markdown for reports and result files, aligned columns for the terminal."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any


def markdown_table(header: Sequence[Any], rows: Iterable[Sequence[Any]],
                   align: str | None = None) -> str:
    """A markdown table; align has one letter per column, "l" (---) or "r" (---:), default all "l".

    >>> print(markdown_table(["a", "b"], [[1, 2]], align="lr"))
    | a | b |
    | --- | ---: |
    | 1 | 2 |
    """
    align = align or "l" * len(header)
    if len(align) != len(header) or set(align) - {"l", "r"}:
        raise ValueError(f"align {align!r}: one of 'l'/'r' per column ({len(header)} columns)")
    lines = [_markdown_row(header), _markdown_row("---:" if a == "r" else "---" for a in align)]
    for row in rows:
        row = list(row)
        if len(row) != len(header):
            raise ValueError(f"row {row!r} has {len(row)} cells, the header {len(header)}")
        lines.append(_markdown_row(row))
    return "\n".join(lines)


def text_table(rows: Sequence[Sequence[Any]]) -> str:
    """Columns padded to their widest cell, two spaces apart (the first row is the header)."""
    cells = [[str(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
                     for row in cells)


def _markdown_row(cells: Iterable[Any]) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"
