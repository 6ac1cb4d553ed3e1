"""evaluate: pair verification and retrieval on the test split, for every compared model
(evaluation.COMPARED_MODELS: baseline vs frozen vs unfrozen).

The embeddings of the models are computed once and saved for embed_viz and gradcam. The
evaluation pairs and query/gallery lists are seeded functions of the split, so every experiment
is scored on the same ones. The search index of the gallery (evaluation.SEARCHED, the unfrozen
model) serves `retrieval search`.

Reads:  params seed, precision, device, data.image_size, evaluate; data/split.csv, data/prepared,
        models/<stage>/best.pt of the stages the models need (train_frozen, train_unfrozen)
Writes: data/eval/{pairs,queries,gallery}.csv, data/embeddings/<model>.npz,
        data/index/gallery.{faiss,csv,json}, metrics/evaluate.json,
        metrics/timing/evaluate.json, plots/evaluate/ (roc.csv, comparison.csv/.md,
        per_class_precision_at_1.csv, classification_report.txt/.json and the figures)
"""

import time
from pathlib import Path

import numpy as np

from retrieval import cache, config, data, evaluation, models, outputs, runtime, search, tracking

STAGE = "evaluate"
PLOTS = Path("plots") / STAGE
CHECKPOINTS = {stage: Path("models") / stage / "best.pt" for stage in evaluation.checkpoints()}


def main() -> None:
    params = config.load_params()
    cfg, size = params.evaluate, params.data.image_size
    table = data.load_split_table("data/split.csv", "data/prepared/dataset.json")
    pairs = evaluation.evaluation_pairs(table, cfg.val_pairs, cfg.test_pairs, params.seed)
    queries, gallery = evaluation.query_gallery(table, cfg.gallery)
    nets = {name: models.load_model(path) for name, path in CHECKPOINTS.items()}
    for name, (_, checkpoint) in nets.items():
        if checkpoint.get("image_size", size) != size:
            raise outputs.UserError(f"{CHECKPOINTS[name]} was trained at image_size "
                                    f"{checkpoint['image_size']}, params say {size}: re-run it")
    keys = ("seed", "precision", "device", "data", STAGE)
    with tracking.stage_run(STAGE, config.select(params, keys),
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
                   for name in evaluation.MODELS}
        scores = {name: result.metrics for name, result in results.items()}

        outputs.write_csv("data/eval/pairs.csv", pairs)
        outputs.write_csv("data/eval/queries.csv", queries)
        outputs.write_csv("data/eval/gallery.csv", gallery)
        for name, vectors in embeddings.items():
            vectors.save(f"data/embeddings/{name}.npz")
        searched = embeddings[evaluation.SEARCHED]
        search.save_index(search.build_index(searched.take(gallery["row"])),
                          "data/index/gallery.faiss")
        outputs.write_csv("data/index/gallery.csv", gallery)
        outputs.write_json("data/index/gallery.json", evaluation.index_card(
            CHECKPOINTS[evaluation.compared_model(evaluation.SEARCHED).checkpoint],
            searched.vectors.shape[1], len(gallery)))

        comparison = evaluation.comparison_table(scores)
        report_text, report = evaluation.classification_reports(results)
        outputs.write_json(f"metrics/{STAGE}.json", scores)
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
        outputs.write_json(f"metrics/timing/{STAGE}.json", timing)
        run.log_metrics(evaluation.flat_metrics(scores), to_parent=True)
        run.log_metrics(timing)
        run.log_artifact(PLOTS)
        print(markdown)


if __name__ == "__main__":
    outputs.run_main(main)
