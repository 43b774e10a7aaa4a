"""Plain-text tables for the CLI (no dependency for something this small)."""

from __future__ import annotations


def format_table(header: list[str], rows: list[list[object]]) -> str:
    """Left-align text columns, right-align numeric ones."""
    cells = [[str(c) for c in header]] + [[_cell(c) for c in row] for row in rows]
    numeric = [
        all(isinstance(r[i], int | float) or r[i] is None for r in rows) if rows else False
        for i in range(len(header))
    ]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for k, r in enumerate(cells):
        parts = [r[i].rjust(widths[i]) if numeric[i] else r[i].ljust(widths[i]) for i in range(len(header))]
        lines.append("  ".join(parts).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(c: object) -> str:
    if c is None:
        return "?"
    if isinstance(c, bool):
        return str(c)
    if isinstance(c, int):
        return f"{c:,}"
    if isinstance(c, float):
        return f"{c:.4g}"
    return str(c)
