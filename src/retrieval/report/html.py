"""The report as one self-contained HTML file: the figures are embedded as data URIs."""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Sequence

from retrieval.report.document import (
    TITLE,
    Bullets,
    Figure,
    Missing,
    Section,
    Table,
    Text,
    embedded_image,
    header_lines,
)
from retrieval.report.inputs import RunInfo

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1100px;
       margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.7em; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
.meta { color: #555; }
.table { overflow-x: auto; margin: .5em 0 1.2em; }
table { border-collapse: collapse; font-size: .9em; }
.caption { font-style: italic; margin: 0 0 .3em; }
th, td { border: 1px solid #bbb; padding: .25em .6em; text-align: left; vertical-align: top; }
th { background: #eef1f5; overflow-wrap: anywhere; } tr:nth-child(even) td { background: #fafafa; }
figure { margin: 1em 0 2em; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-style: italic; color: #444; margin-top: .3em; }
.missing { background: #fff4e0; border-left: 4px solid #e69500; padding: .5em 1em; }
.observations { background: #f2f7ff; border-left: 4px solid #3b78c2; padding: .3em 1em; }
code { background: #f2f2f2; padding: 0 .2em; }
"""


def _html_inline(text: str) -> str:
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def render_html(sections: Sequence[Section], run: RunInfo) -> str:
    """One self-contained HTML file: the PNGs are embedded as data URIs."""
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{html.escape(TITLE)}</title><style>{CSS}</style></head><body>",
           f"<h1>{html.escape(TITLE)}</h1>",
           '<p class="meta">' + "<br>".join(map(html.escape, header_lines(run))) + "</p>",
           '<nav><h2>Contents</h2><ol>']
    out += [f'<li><a href="#{s.id}">{html.escape(s.title)}</a></li>' for s in sections]
    out.append("</ol></nav>")
    figure_number = 0
    for i, section in enumerate(sections, 1):
        out.append(f'<section id="{section.id}"><h2>{i}. {html.escape(section.title)}</h2>')
        for block in section.blocks:
            if isinstance(block, Text):
                out.append(f"<p>{_html_inline(block.text)}</p>")
            elif isinstance(block, Missing):
                out.append(f'<p class="missing"><b>Missing:</b> {_html_inline(block.text)}</p>')
            elif isinstance(block, Bullets):
                out.append('<div class="observations">' + (
                    f"<h3>{html.escape(block.title)}</h3>" if block.title else "") + "<ul>"
                    + "".join(f"<li>{_html_inline(item)}</li>" for item in block.items)
                    + "</ul></div>")
            elif isinstance(block, Table):
                caption = (f'<p class="caption">{html.escape(block.caption)}</p>'
                           if block.caption else "")
                out.append(f'<div class="table">{caption}<table>'
                           + "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in block.header)
                           + "</tr>" + "".join(
                               "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row)
                               + "</tr>" for row in block.rows) + "</table></div>")
            elif isinstance(block, Figure):
                figure_number += 1
                mime, raw = embedded_image(block.path)
                data = base64.b64encode(raw).decode("ascii")
                out.append(f'<figure data-key="{html.escape(block.key)}">'
                           f'<img src="data:{mime};base64,{data}" '
                           f'alt="{html.escape(block.caption)}">'
                           f"<figcaption>Figure {figure_number} ({html.escape(block.key)}): "
                           f"{html.escape(block.caption)}</figcaption></figure>")
        out.append("</section>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"

