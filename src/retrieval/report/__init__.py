"""The pipeline's report: every stage's metrics and figures, with observations from the numbers.

Read the modules in this order:
  `inputs`        what the stages left (metrics JSON, PNGs, histories, params) and MLflow's runs,
                  read into `Inputs`; a stage that has not run is absent, never an error;
  `sections`      the registry: one `SectionSpec` per section (title, needed stages, figures,
                  tables, observations, `in_summary` flags) and `build_sections`;
  `observations`  the sentences, each computed from the numbers;
  `tables`        the tables; `figures` the one figure the report draws itself;
  `document`      the blocks a section is made of (text, bullets, tables, figures, notices);
  `markdown`, `html`, `pdf`   one renderer each, drawing the same sections;
  `formatting`    how numbers print (3 decimals everywhere, so a test can find each metric).

Nothing here reads the clock: the output is a function of the inputs. A new section is one
entry of `sections.SECTIONS`.
"""

from retrieval.report.document import (
    TITLE,
    Block,
    Bullets,
    Figure,
    Missing,
    Section,
    Table,
    Text,
)
from retrieval.report.formatting import fmt, fmt_param
from retrieval.report.html import render_html
from retrieval.report.inputs import (
    MODELS,
    STAGES,
    TRAIN_STAGES,
    Inputs,
    RunInfo,
    experiments_table,
    load_inputs,
    on_same_data,
)
from retrieval.report.markdown import render_markdown
from retrieval.report.pdf import render_pdf
from retrieval.report.sections import (
    LR_FIGURE,
    SECTIONS,
    FigureSpec,
    Observation,
    SectionSpec,
    build_sections,
    drawn_figures,
)

__all__ = ["LR_FIGURE", "MODELS", "SECTIONS", "STAGES", "TITLE", "TRAIN_STAGES", "Block",
           "Bullets", "Figure", "FigureSpec", "Inputs", "Missing", "Observation", "RunInfo",
           "Section", "SectionSpec", "Table", "Text", "build_sections", "drawn_figures",
           "experiments_table", "fmt", "fmt_param", "load_inputs", "on_same_data", "render_html",
           "render_markdown", "render_pdf"]
