"""Plain text tables laid out as Ollama's tablewriter settings print them.

No borders, left aligned, every cell padded to its column's width followed by four spaces
(so rows end in padding, as Ollama's do).
"""

from __future__ import annotations

from collections.abc import Sequence

PAD = "    "


def table(rows: Sequence[Sequence[str]], indent: str = "") -> str:
    if not rows:
        return ""
    widths = [0] * max(len(r) for r in rows)
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    lines = []
    for row in rows:
        cells = [cell.ljust(widths[i]) + PAD for i, cell in enumerate(row)]
        lines.append(indent + "".join(cells))
    return "\n".join(lines)
