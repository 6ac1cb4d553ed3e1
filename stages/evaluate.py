"""evaluate: pair verification and retrieval on the test split, for every compared model
(compared.COMPARED_MODELS: baseline vs frozen vs unfrozen).

The embeddings of the models are computed once and saved for embed_viz and gradcam. The
evaluation pairs and query/gallery lists are seeded functions of the split, so every experiment
is scored on the same ones. The search index of the gallery (compared.SEARCHED, the unfrozen
model) serves `retrieval search`.

Reads:  params seed, precision, device, data.image_size, evaluate; data/split.csv, data/prepared,
        models/<stage>/best.pt of the stages the models need (train_frozen, train_unfrozen)
Writes: data/eval/{pairs,queries,gallery,per_query}.csv (per_query: the searched model's
        test queries, failures first), data/embeddings/<model>.npz,
        models/<stage>/threshold.json (the decision threshold chosen here on the val pairs for
        that stage's checkpoint, with its SHA-256: retrieval.threshold),
        data/index/gallery.{faiss,csv,json}, metrics/details/evaluate.json (every score),
        metrics/evaluate/<model>.json (the headline: P@1, mAP, pair accuracy, ROC AUC),
        metrics/timing/evaluate.json, plots/evaluate/ (roc.csv, comparison.csv/.md,
        per_class_precision_at_1.csv, classification_report.txt/.json and the figures, among
        them similarity.png: cosine similarity of same- vs different-class test pairs, and
        retrieval.html: every query with its neighbours, failures first);
        MLflow: the gallery index, and a new version of the registered model (its checkpoint
        as train_unfrozen logged it), tagged with the git commit, DVC experiment, test mAP and
        the decision threshold chosen here
"""

import time

import numpy as np

from retrieval import (
    cache,
    compared,
    config,
    data,
    evaluation,
    headline,
    models,
    outputs,
    paths,
    publish,
    retrieval_view,
    runtime,
    threshold,
    tracking,
    workspace,
)
from retrieval import (
    gallery as gallery_index,
)

STAGE = "evaluate"
PLOTS = paths.plots(STAGE)
CHECKPOINTS = {stage: paths.checkpoint(stage) for stage in compared.checkpoints()}


def main() -> None:
    params = config.load_params()
    cfg, size = params.evaluate, params.data.image_size
    table = data.load_split_table(paths.SPLIT_CSV, paths.DATASET_JSON)
    pairs = evaluation.evaluation_pairs(table, cfg.val_pairs, cfg.test_pairs, params.seed)
    queries, gallery = evaluation.query_gallery(table, cfg.gallery)
    # Scored under these params only if the checkpoints are the models they describe.
    nets = {name: models.load_model(path, expected=params.model, image_size=size, writer=name)
            for name, path in CHECKPOINTS.items()}
    with tracking.stage_run(STAGE, config.select(params, config.stage_params(STAGE)),
                            config.flatten(config.to_dict(params))) as run:
        started = time.perf_counter()
        images = cache.images_for(table["file"].tolist(), size)
        # Every val and test image (and the gallery): later stages reuse these embeddings.
        rows = np.union1d(np.flatnonzero(table["split"].isin(["val", "test"])), gallery["row"])
        embeddings = evaluation.embed_models(
            {stage: net for stage, (net, _) in nets.items()}, images, table, rows, size,
            runtime.resolve_device(params.device), params.precision)
        embed_seconds = time.perf_counter() - started
        results = {name: evaluation.evaluate_model(embeddings[name], pairs, queries, gallery,
                                                   cfg, params.seed)
                   for name in compared.MODELS}
        scores = {name: result.metrics for name, result in results.items()}

        outputs.write_csv(paths.EVAL / "pairs.csv", pairs)
        outputs.write_csv(paths.EVAL / "queries.csv", queries)
        outputs.write_csv(paths.EVAL / "gallery.csv", gallery)
        for name, vectors in embeddings.items():
            vectors.save(paths.embeddings(name))
        # The one decision threshold of each trained checkpoint: `retrieval compare`, the
        # search page, the export and the report read it from beside the checkpoint.
        val_pairs = int((pairs["split"] == "val").sum())
        for name, stage in threshold.saved_models().items():
            threshold.save(threshold.card(scores[name]["threshold"], CHECKPOINTS[stage], name,
                                          val_pairs, cfg.threshold_criterion),
                           paths.threshold(stage))
        # The searched model's test gallery for `retrieval search`/`serve`, deciding "same" at
        # the threshold chosen here on the val pairs.
        writer = compared.compared_model(compared.SEARCHED).checkpoint
        manifest = gallery.assign(content_hash=[data.content_hash(workspace.resolve(f))
                                                for f in gallery["file"]])
        saved, _ = gallery_index.build(
            embeddings[compared.SEARCHED].take(gallery["row"]), manifest, CHECKPOINTS[writer],
            size, scores[compared.SEARCHED]["threshold"])
        gallery_index.save(saved, paths.GALLERY_INDEX)

        comparison = evaluation.comparison_table(scores)
        report_text, report = evaluation.classification_reports(results)
        headline.write(STAGE, scores)
        outputs.write_csv(PLOTS / "roc.csv", evaluation.roc_table(results))
        outputs.write_csv(PLOTS / "comparison.csv", comparison)
        markdown = evaluation.comparison_markdown(comparison, scores)
        outputs.write_text(PLOTS / "comparison.md", markdown)
        outputs.write_csv(PLOTS / "per_class_precision_at_1.csv",
                          evaluation.per_class_table(results))
        outputs.write_text(PLOTS / "classification_report.txt", report_text)
        outputs.write_json(PLOTS / "classification_report.json", report)
        for name, figure in evaluation.figures(results, images, queries, gallery, cfg.examples,
                                               params.seed).items():
            outputs.save_figure(figure, PLOTS / f"{name}.png")
        timing = {"embed_seconds": embed_seconds, "images_embedded": len(rows),
                  "images_per_second": len(rows) / max(embed_seconds, 1e-9),
                  "evaluate_seconds": time.perf_counter() - started}
        view = retrieval_view.of_model(compared.SEARCHED, results[compared.SEARCHED],
                                       scores[compared.SEARCHED], queries, gallery, images, cfg)
        outputs.write_csv(paths.EVAL / "per_query.csv", view.worst_first)
        outputs.write_text(PLOTS / "retrieval.html", view.page)
        outputs.write_json(paths.timing(STAGE), timing)
        run.log_metrics(evaluation.flat_metrics(scores))
        run.log_headline(headline.flat(STAGE, scores))
        run.log_metrics(timing)
        run.log_artifact(PLOTS)
        run.log_artifact(paths.GALLERY_INDEX.parent, "index")
        if params.tracking.log_models:
            version = publish.register_checkpoint(
                run, CHECKPOINTS[writer], writer, scores[compared.SEARCHED]["map"], images, rows,
                scores[compared.SEARCHED]["threshold"])
            print(f"registered {tracking.REGISTERED_MODEL} version {version}")
        print(markdown)


if __name__ == "__main__":
    outputs.run_main(main)
