"""report: the pipeline's report with images, built from every stage's metrics and plots.

Sections whose stage has not run say so instead of failing. Run ids and the comparison across
experiments come from MLflow; everything else from the files below.

Reads:  params.yaml (all of it, for the configuration section); metrics/details/<stage>.json,
        plots/<stage>/ (*.png, history.csv, class_counts.csv), data/prepared/excluded.csv,
        models/train_unfrozen/{threshold.json,best.pt} (evaluate's decision threshold, checked
        against the checkpoint's SHA-256);
        MLflow (this execution's run ids, the other pipeline runs)
Writes: report/report.html (self-contained), report/Report.pdf, report/report.md with its
        images in report/figures/; logged to MLflow as the report run's artifacts
"""

import os
import shutil

from retrieval import compared, config, outputs, paths, report, threshold, tracking

STAGE = "report"
OUT = paths.REPORT
FIGURES = OUT / "figures"


def main() -> None:
    params = config.load_params()
    flat = config.flatten(config.to_dict(params))
    with tracking.stage_run(STAGE, config.select(params, config.stage_params(STAGE)),
                            flat) as run:
        run_ids = tracking.pipeline_run_ids(flat)
        run_info = report.RunInfo(tracking.git_commit(),
                                  os.environ.get("DVC_EXP_NAME") or "workspace", run_ids,
                                  tracking.run_durations(run_ids))
        experiments = report.experiments_table(
            report.on_same_data(tracking.pipeline_runs(), flat), run_info.run_ids.get("pipeline"))
        # The searched model's threshold as `retrieval compare` finds it for the checkpoint.
        decision = threshold.of_evaluate(
            paths.checkpoint(compared.compared_model(compared.SEARCHED).checkpoint))
        inputs = report.load_inputs(paths.DETAILS, paths.PLOTS, flat, run_info, experiments,
                                    paths.EXCLUDED_CSV, decision)
        shutil.rmtree(FIGURES, ignore_errors=True)  # figures of a stage that no longer exists
        for key, path in inputs.figures.items():  # report.md and its images travel together
            with outputs.atomic_path(FIGURES / f"{key}.png") as temp:
                shutil.copyfile(path, temp)
        for key, figure in list(report.drawn_figures(inputs)):
            outputs.save_figure(figure, FIGURES / f"{key}.png")
            inputs.figures[key] = FIGURES / f"{key}.png"
        sections = report.build_sections(inputs)
        with outputs.atomic_path(OUT / "report.md") as temp:
            temp.write_text(report.render_markdown(
                sections, run_info, lambda figure: f"figures/{figure.key}.png"))
        with outputs.atomic_path(OUT / "report.html") as temp:
            temp.write_text(report.render_html(sections, run_info))
        with outputs.atomic_path(OUT / "Report.pdf") as temp:
            report.render_pdf(sections, run_info, temp)
        run.log_artifact(OUT, STAGE)
        run.link_on_parent("Report", f"{STAGE}/report.html")
        print(f"wrote {OUT / 'report.html'}, {OUT / 'Report.pdf'}, {OUT / 'report.md'}")


if __name__ == "__main__":
    outputs.run_main(main)
