"""One self-contained HTML page: styles inline, figures as base64 PNG data URIs, no scripts and
no external resources, so it opens anywhere (and renders in headless Chromium without errors)."""

from __future__ import annotations

import base64
from html import escape
from pathlib import Path

from camex.report.tables import Table, body, caption, header, legend

_STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 0.5em 0; font-size: 13px; }
th, td { border: 1px solid #bbb; padding: 3px 6px; text-align: left; vertical-align: top; }
th { background: #eee; }
td.missing { color: #999; }
figure { margin: 1em 0; }
img { max-width: 100%; border: 1px solid #ddd; }
.legend { font-size: 12px; color: #444; }
"""


def _table_html(table: Table) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header(table))
    rows = []
    for row in body(table):
        cells = [f"<th>{escape(row[0])}</th>"]
        cells += [f'<td class="missing">{escape(x)}</td>' if x.startswith("missing") else f"<td>{escape(x)}</td>"
                  for x in row[1:]]  # fmt: skip
        rows.append("<tr>" + "".join(cells) + "</tr>")
    notes = "".join(f"<li>{escape(x)}</li>" for x in legend(table))
    return (f"<h3>{escape(caption(table))}</h3><table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}"
            f"</tbody></table><ul class=\"legend\">{notes}</ul>")  # fmt: skip


def _figure_html(title: str, png: Path) -> str:
    data = base64.b64encode(png.read_bytes()).decode("ascii")
    return f'<figure><img alt="{escape(title)}" src="data:image/png;base64,{data}"><figcaption>{escape(title)}' \
           "</figcaption></figure>"  # fmt: skip


def render_page(title: str, intro: list[str], sections: list[tuple[str, list[Table], list[tuple[str, Path]]]]) -> str:
    """`sections`: (heading, tables, [(figure title, png path)])."""
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{escape(title)}</title>",
             f"<style>{_STYLE}</style></head><body><h1>{escape(title)}</h1>"]  # fmt: skip
    parts += [f"<p>{escape(line)}</p>" for line in intro]
    for heading, tables, figures in sections:
        parts.append(f"<h2>{escape(heading)}</h2>")
        parts += [_table_html(t) for t in tables]
        parts += [_figure_html(name, png) for name, png in figures]
        if not tables and not figures:
            parts.append("<p>No runs for this section.</p>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
