"""HTML pieces every report section uses: a formatted value, a table of escaped cells, a note."""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape
from typing import Any

__all__ = ["fmt", "note", "table"]


def fmt(value: Any, digits: int = 4) -> str:
    if value is None or value == "":
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and abs(value) < 1e-2:
            mantissa, exponent = f"{value:.2e}".split("e")
            return f"{mantissa}e{int(exponent)}"
        return f"{value:.{digits}f}"
    return escape(str(value))


def table(header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1, css: str = "") -> str:
    """A table of already escaped cells; the first ``left`` columns align left."""
    def cell(tag: str, i: int, text: str) -> str:
        return f'<{tag}{" class=l" if i < left else ""}>{text}</{tag}>'

    head = "".join(cell("th", i, escape(h)) for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(cell("td", i, c) for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f'<div class="scroll"><table class="{css}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def note(text: str) -> str:
    return f'<p class="note">{escape(text)}</p>'
