"""The report as GitHub-flavoured markdown, with its figures as relative image links."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from retrieval.report.document import (
    TITLE,
    Bullets,
    Figure,
    Missing,
    Section,
    Table,
    Text,
    header_lines,
)
from retrieval.report.inputs import RunInfo


def render_markdown(sections: Sequence[Section], run: RunInfo,
                    figure_path: Callable[[Figure], str]) -> str:
    """GitHub-flavoured markdown; `figure_path` gives each figure's relative image path."""
    def inline(text: str) -> str:
        return text.replace("|", "\\|")

    lines = [f"# {TITLE}", "", *[f"{line}  " for line in header_lines(run)], "", "## Contents",
             ""]
    lines += [f"{i}. [{s.title}](#{s.id})" for i, s in enumerate(sections, 1)]
    figure_number = 0
    for i, section in enumerate(sections, 1):
        lines += ["", f'<a id="{section.id}"></a>', "", f"## {i}. {section.title}", ""]
        for block in section.blocks:
            if isinstance(block, Text):
                lines += [block.text, ""]
            elif isinstance(block, Missing):
                lines += [f"> **Missing:** {block.text}", ""]
            elif isinstance(block, Bullets):
                lines += ([f"**{block.title}**", ""] if block.title else [])
                lines += [f"- {item}" for item in block.items] + [""]
            elif isinstance(block, Table):
                if block.caption:
                    lines += [f"*{block.caption}*", ""]
                lines.append("| " + " | ".join(map(inline, block.header)) + " |")
                lines.append("|" + "|".join("---" for _ in block.header) + "|")
                lines += ["| " + " | ".join(map(inline, row)) + " |" for row in block.rows]
                lines.append("")
            elif isinstance(block, Figure):
                figure_number += 1
                lines += [f"![{block.caption}]({figure_path(block)})", "",
                          f"*Figure {figure_number} ({block.key}): {block.caption}*", ""]
    return "\n".join(lines).rstrip() + "\n"
