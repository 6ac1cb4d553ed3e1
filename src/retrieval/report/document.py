"""The report as a document: sections made of blocks, which every renderer draws the same way.

`sections.build_sections` produces these; `markdown`, `html` and `pdf` render them. A block knows
nothing about where its content came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from retrieval.report.inputs import RunInfo

TITLE = "Image retrieval with contrastive learning: pipeline report"


@dataclass(frozen=True)
class Text:
    text: str  # `code` spans are rendered as code


@dataclass(frozen=True)
class Bullets:
    items: tuple[str, ...]
    title: str = ""


@dataclass(frozen=True)
class Table:
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    caption: str = ""


@dataclass(frozen=True)
class Figure:
    key: str  # "stage/name", e.g. "evaluate/roc"
    path: Path
    caption: str


@dataclass(frozen=True)
class Missing:
    text: str  # what is missing and how to produce it


Block = Text | Bullets | Table | Figure | Missing


@dataclass
class Section:
    id: str
    title: str
    blocks: list[Block] = field(default_factory=list)


def header_lines(run: RunInfo) -> list[str]:
    """The lines under the title: which experiment and commit the report describes."""
    return [f"DVC experiment: {run.dvc_experiment}", f"git commit: {run.git_commit}"]


def embedded_image(path: Path, max_png_bytes: int = 400_000, opaque: bool = False
                   ) -> tuple[str, bytes]:
    """(MIME type, bytes) to embed: PNGs over `max_png_bytes` (image grids) become JPEG
    (quality 90), which keeps the HTML and PDF a few MB instead of tens; `opaque` flattens
    transparency onto white (the PDF would otherwise carry a second, mask image per figure)."""
    data = path.read_bytes()
    large = len(data) > max_png_bytes
    if not large and not opaque:
        return "image/png", data
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        rgba = image.convert("RGBA")
    flat = Image.new("RGB", rgba.size, "white")
    flat.paste(rgba, mask=rgba.getchannel("A"))
    buffer = io.BytesIO()
    if large:
        flat.save(buffer, format="JPEG", quality=90)
        return "image/jpeg", buffer.getvalue()
    flat.save(buffer, format="PNG")
    return "image/png", buffer.getvalue()
