"""One self-contained HTML page (styles inline, figures as base64 PNG data URIs, no scripts and
no external resources, so it opens anywhere and renders in headless Chromium without errors),
and the same page as Markdown. A page is a list of blocks, in order."""

from __future__ import annotations

import base64
from html import escape
from pathlib import Path
from typing import Any

from camex.report.tables import Grid, to_markdown

# ("h2" | "h3" | "p", text), ("ul", [text]), ("grid", Grid), ("figure", (title, png path))
Block = tuple[str, Any]

_STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 0.5em 0; font-size: 13px; }
th, td { border: 1px solid #bbb; padding: 3px 6px; text-align: left; vertical-align: top; }
th { background: #eee; }
td.missing { color: #999; }
figure { margin: 1em 0; }
img { max-width: 100%; border: 1px solid #ddd; }
.legend { font-size: 12px; color: #444; }
.intro { font-size: 13px; color: #444; margin: 0.2em 0; }
"""


def _grid_html(grid: Grid) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in grid.header)
    rows = []
    for row in grid.body:
        cells = [f"<th>{escape(row[0])}</th>"]
        cells += [f'<td class="missing">{escape(x)}</td>' if x.startswith("missing") else f"<td>{escape(x)}</td>"
                  for x in row[1:]]  # fmt: skip
        rows.append("<tr>" + "".join(cells) + "</tr>")
    notes = "".join(f"<li>{escape(x)}</li>" for x in grid.legend)
    return (f"<h3>{escape(grid.caption)}</h3><table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}"
            f"</tbody></table><ul class=\"legend\">{notes}</ul>")  # fmt: skip


def _figure_html(title: str, png: Path) -> str:
    data = base64.b64encode(png.read_bytes()).decode("ascii")
    return f'<figure><img alt="{escape(title)}" src="data:image/png;base64,{data}"><figcaption>{escape(title)}' \
           "</figcaption></figure>"  # fmt: skip


def render_page(title: str, intro: list[str], blocks: list[Block]) -> str:
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{escape(title)}</title>",
             f"<style>{_STYLE}</style></head><body><h1>{escape(title)}</h1>"]  # fmt: skip
    parts += [f'<p class="intro">{escape(line)}</p>' for line in intro]
    for kind, value in blocks:
        if kind in ("h2", "h3", "p"):
            parts.append(f"<{kind}>{escape(value)}</{kind}>")
        elif kind == "ul":
            parts.append("<ul>" + "".join(f"<li>{escape(x)}</li>" for x in value) + "</ul>")
        elif kind == "grid":
            parts.append(_grid_html(value))
        elif kind == "figure":
            parts.append(_figure_html(*value))
        else:
            raise ValueError(f"unknown block kind {kind!r}")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def render_markdown(title: str, intro: list[str], blocks: list[Block]) -> str:
    parts = [f"# {title}", "", *[f"{line}  " for line in intro], ""]
    for kind, value in blocks:
        if kind == "h2":
            parts += [f"## {value}", ""]
        elif kind == "h3":
            parts += [f"#### {value}", ""]
        elif kind == "p":
            parts += [value, ""]
        elif kind == "ul":
            parts += [f"- {x}" for x in value] + [""]
        elif kind == "grid":
            parts.append(to_markdown(value))
        elif kind == "figure":
            name, png = value
            parts += [f"![{name}](figures/{png.name}) ([SVG](figures/{png.stem}.svg), [data](figures/{png.stem}.csv))",
                      ""]  # fmt: skip
    return "\n".join(parts)
