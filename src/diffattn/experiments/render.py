"""The report's building blocks and their two renderings: Markdown and one self-contained HTML page.

A report is a list of :class:`Block` (headings, paragraphs, lists, tables, images); numbers in tables go
through :func:`_fmt`, "mean ± std over seeds" through :func:`_pm` (utils/stats.py: the sample std).
"""

from __future__ import annotations

import base64
import html
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..utils import stats


@dataclass
class Block:
    kind: str  # "h1" | "h2" | "h3" | "p" | "table" | "image" | "list"
    text: str = ""
    header: Sequence[str] = ()
    rows: Sequence[Sequence[Any]] = ()
    items: Sequence[str] = ()


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        if math.isnan(x):
            return "—"
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        return f"{x:.{digits}f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def _mean(xs):
    return stats.mean(xs, drop_nan=True)


def _std(xs):
    return stats.sample_std(xs)


def _pm(xs, digits=3) -> str:
    m, s = _mean(xs), _std(xs)
    if m is None:
        return "—"
    return f"{m:.{digits}f} ± {s:.{digits}f}" if s is not None else f"{m:.{digits}f}"


# ---------------------------------------------------------------------------------------- renderers
def to_markdown(blocks: list[Block]) -> str:
    lines: list[str] = []
    for b in blocks:
        if b.kind == "h1":
            lines += [f"# {b.text}", ""]
        elif b.kind in ("h2", "h3"):
            lines += [f"{'#' * int(b.kind[1])} {b.text}", ""]
        elif b.kind == "p":
            lines += [b.text, ""]
        elif b.kind == "list":
            lines += [f"- {item}" for item in b.items] + [""]
        elif b.kind == "table":
            lines.append("| " + " | ".join(map(str, b.header)) + " |")
            lines.append("|" + "|".join("---" for _ in b.header) + "|")
            lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in b.rows]
            lines.append("")
        elif b.kind == "image":
            lines += [f"![{b.text}]({b.text})", ""]
    return "\n".join(lines)


def _inline_md(text: str) -> str:
    """The little Markdown the blocks use: **bold**, *emphasis* and `code`."""
    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    text = re.sub(r"(?<![\w*])\*(?![\s*])(.+?)(?<![\s*])\*(?![\w*])", r"<em>\1</em>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def to_html(blocks: list[Block], out: Path) -> str:
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>diffattn compare report</title><style>",
             "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}",
             "table{border-collapse:collapse;margin:1em 0;font-size:14px}td,th{border:1px solid #ccc;padding:4px 8px}",
             "th{background:#f3f3f3}img{max-width:100%}code{background:#f5f5f5;padding:0 3px}",
             "</style></head><body>"]
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            parts.append(f"<{b.kind}>{_inline_md(b.text)}</{b.kind}>")
        elif b.kind == "p":
            parts.append(f"<p>{_inline_md(b.text)}</p>")
        elif b.kind == "list":
            parts.append("<ul>" + "".join(f"<li>{_inline_md(i)}</li>" for i in b.items) + "</ul>")
        elif b.kind == "table":
            head = "".join(f"<th>{_inline_md(str(h))}</th>" for h in b.header)
            body = "".join("<tr>" + "".join(f"<td>{_inline_md(_fmt(c))}</td>" for c in row) + "</tr>" for row in b.rows)
            parts.append(f"<table><tr>{head}</tr>{body}</table>")
        elif b.kind == "image":
            data = base64.b64encode((out / b.text).read_bytes()).decode()
            parts.append(f"<p><img alt='{html.escape(b.text)}' src='data:image/png;base64,{data}'></p>")
    parts.append("</body></html>")
    return "\n".join(parts)


__all__ = ["Block", "to_markdown", "to_html"]
