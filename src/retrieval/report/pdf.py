"""The report as an A4 PDF, drawn with reportlab (no browser needed)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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


def _pdf_inline(text: str) -> str:
    from xml.sax.saxutils import escape

    return re.sub(r"`([^`]+)`", r'<font face="Courier">\1</font>', escape(text))


def render_pdf(sections: Sequence[Section], run: RunInfo, path: str | Path) -> None:
    """A4 PDF with reportlab: headings (also as PDF bookmarks), tables, figures scaled to the
    page width. `invariant` makes the bytes a function of the content (no creation date)."""
    import io

    from reportlab.lib import colors
    from reportlab.lib.pagesizes import A4
    from reportlab.lib.styles import ParagraphStyle, getSampleStyleSheet
    from reportlab.lib.units import cm
    from reportlab.platypus import (
        Image,
        KeepTogether,
        Paragraph,
        SimpleDocTemplate,
        Spacer,
        TableStyle,
    )
    from reportlab.platypus import Table as PdfTable

    styles = getSampleStyleSheet()
    body = ParagraphStyle("body", parent=styles["BodyText"], fontSize=9.5, leading=12.5)
    small = ParagraphStyle("small", parent=body, fontSize=7.5, leading=9)
    caption = ParagraphStyle("caption", parent=body, fontName="Helvetica-Oblique", fontSize=8.5,
                             leading=11, textColor=colors.HexColor("#444444"))
    h1 = ParagraphStyle("h1", parent=styles["Heading1"], spaceBefore=14, keepWithNext=1)
    missing = ParagraphStyle("missing", parent=body, backColor=colors.HexColor("#fff4e0"),
                             borderPadding=4, textColor=colors.HexColor("#7a4b00"))

    class Document(SimpleDocTemplate):
        def afterFlowable(self, flowable: Any) -> None:  # PDF outline from the headings
            key = getattr(flowable, "_bookmark", None)
            if key:
                self.canv.bookmarkPage(key)
                self.canv.addOutlineEntry(flowable.getPlainText(), key, level=0)

    def page_number(canvas: Any, doc: Any) -> None:
        canvas.setFont("Helvetica", 8)
        canvas.drawRightString(A4[0] - 1.5 * cm, 1 * cm, f"page {doc.page}")

    doc = Document(str(path), pagesize=A4, leftMargin=1.5 * cm, rightMargin=1.5 * cm,
                   topMargin=1.5 * cm, bottomMargin=1.6 * cm, title=TITLE, author="retrieval",
                   invariant=1)
    width, height = doc.width, doc.height
    story: list[Any] = [Paragraph(TITLE, styles["Title"])]
    story += [Paragraph(_pdf_inline(line), body) for line in header_lines(run)]
    story.append(Spacer(1, 0.4 * cm))
    figure_number = 0
    for i, section in enumerate(sections, 1):
        heading = Paragraph(f"{i}. {_pdf_inline(section.title)}", h1)
        heading._bookmark = section.id
        story.append(heading)
        for block in section.blocks:
            if isinstance(block, Text):
                story.append(Paragraph(_pdf_inline(block.text), body))
            elif isinstance(block, Missing):
                story += [Paragraph("<b>Missing:</b> " + _pdf_inline(block.text), missing),
                          Spacer(1, 0.2 * cm)]
            elif isinstance(block, Bullets):
                if block.title:
                    story.append(Paragraph(f"<b>{_pdf_inline(block.title)}</b>", body))
                story += [Paragraph(_pdf_inline(item), body, bulletText="\u2022")
                          for item in block.items]
                story.append(Spacer(1, 0.2 * cm))
            elif isinstance(block, Table):
                style = small if len(block.header) > 4 else body
                cells = [[Paragraph(f"<b>{_pdf_inline(h)}</b>", style) for h in block.header]]
                cells += [[Paragraph(_pdf_inline(c), style) for c in row] for row in block.rows]
                # Column widths follow the longest cell; headers may wrap between words.
                lengths = [max([max(map(len, block.header[j].split() or [""]))]
                               + [len(r[j]) for r in block.rows]) + 2
                           for j in range(len(block.header))]
                char = 0.19 * cm * (0.8 if style is small else 1)
                widths = [n * char + 0.3 * cm for n in lengths]
                if sum(lengths) > 90:  # too wide: share the page, each column keeping room
                    # for its longest word (a column's share of a long row could be less than
                    # its padding, which reportlab refuses)
                    words = [max(len(w) for text in (block.header[j], *(r[j] for r in block.rows))
                                 for w in (text.split() or [""])) for j in range(len(lengths))]
                    least = [n * char + 0.45 * cm for n in words]
                    spare = width - sum(least)
                    widths = ([m + spare * n / sum(lengths) for m, n in zip(least, lengths,
                                                                             strict=True)]
                              if spare > 0 else [width * m / sum(least) for m in least])
                table = PdfTable(cells, colWidths=widths, repeatRows=1, hAlign="LEFT")
                table.setStyle(TableStyle([
                    ("GRID", (0, 0), (-1, -1), 0.4, colors.HexColor("#bbbbbb")),
                    ("BACKGROUND", (0, 0), (-1, 0), colors.HexColor("#eef1f5")),
                    ("VALIGN", (0, 0), (-1, -1), "TOP"),
                    ("TOPPADDING", (0, 0), (-1, -1), 1.5),
                    ("BOTTOMPADDING", (0, 0), (-1, -1), 1.5)]))
                parts = [Paragraph(_pdf_inline(block.caption), caption)] if block.caption else []
                story += [*parts, table, Spacer(1, 0.35 * cm)]
            elif isinstance(block, Figure):
                figure_number += 1
                image = Image(io.BytesIO(embedded_image(block.path, opaque=True)[1]))
                scale = min(width / image.imageWidth, 0.78 * height / image.imageHeight)
                image.drawWidth, image.drawHeight = (image.imageWidth * scale,
                                                     image.imageHeight * scale)
                story.append(KeepTogether([image, Paragraph(
                    f"Figure {figure_number} ({_pdf_inline(block.key)}): "
                    f"{_pdf_inline(block.caption)}", caption), Spacer(1, 0.4 * cm)]))
    doc.build(story, onFirstPage=page_number, onLaterPages=page_number)
