"""embed_viz: the test embeddings before (baseline) and after training, in 2-D, and how well the
classes separate in the full embedding space: silhouette (Euclidean and cosine), leave-one-out
kNN accuracy and P@1, and whether the classes form radial spokes or compact clusters.

t-SNE (seeded, PCA-initialised) and PCA of a seeded subsample of at most embed_viz.max_points
test images, every compared model (compared.COMPARED_MODELS) side by side; the largest classes
are coloured, the rest grey. A model whose embedding is 2-D is also plotted directly.

Reads:  params seed, embed_viz; data/embeddings/<model>.npz (from evaluate)
Writes: plots/embed_viz/{tsne,pca}.png (and direct.png for 2-D embeddings),
        metrics/details/embed_viz.json, metrics/timing/embed_viz.json (no headline metrics)
"""

import time

from retrieval import compared, config, embed_viz, evaluation, outputs, paths, tracking
from retrieval.plots import evaluation as evaluation_plots

STAGE = "embed_viz"
PLOTS = paths.plots(STAGE)
METHODS = {"tsne": ("t-SNE", "t-SNE"), "pca": ("PCA", "PC")}  # file: (title, axis name)


def main() -> None:
    params = config.load_params()
    cfg = params.embed_viz
    embeddings = embed_viz.load_split_embeddings(
        {name: paths.embeddings(name) for name in compared.MODELS}, "test")
    first = next(iter(embeddings.values()))  # all cover the same images
    keep = embed_viz.sample(len(first.rows), cfg.max_points, params.seed)
    labels = first.labels[keep]
    vectors = {name: e.vectors[keep] for name, e in embeddings.items()}
    highlighted = embed_viz.highlighted_classes(labels, cfg.highlight_classes)
    with tracking.stage_run(STAGE, config.select(params, config.stage_params(STAGE)),
                            config.flatten(config.to_dict(params))) as run:
        scores = {name: {"silhouette": embed_viz.silhouette(v, labels),
                         "embedding_dim": v.shape[1],
                         **embed_viz.knn_scores(v, labels, cfg.knn_k),
                         **embed_viz.geometry(v, labels)} for name, v in vectors.items()}
        subtitles = {name: f"{v.shape[1]}-d, silhouette {_score(scores[name]['silhouette'])}, "
                     f"{cfg.knn_k}-NN acc. {_score(scores[name]['knn_accuracy'])}"
                     for name, v in vectors.items()}
        timing = {}
        for method, (title, axis) in METHODS.items():
            started = time.perf_counter()
            points = {name: embed_viz.project_2d(v, method, params.seed, cfg.perplexity)
                      for name, v in vectors.items()}
            timing[f"{method}_seconds"] = time.perf_counter() - started
            outputs.save_figure(evaluation_plots.embedding_scatter(
                points, labels, highlighted, f"{title} of {len(labels)} test embeddings: "
                f"{embed_viz.before_and_after()}", axis, subtitles), PLOTS / f"{method}.png")
        direct = {name: v for name, v in vectors.items() if v.shape[1] == 2}
        if direct:
            raw = [name for name in direct if not scores[name]["unit_length"]]
            outputs.save_figure(evaluation_plots.embedding_scatter(
                direct, labels, highlighted, f"{len(labels)} test embeddings plotted directly "
                + (f"(raw head output: {', '.join(raw)})" if raw else
                   "(L2-normalised: on the unit circle)"), "embedding",
                {name: subtitles[name] + (f"\n{scores[name]['class_shape']} (elongation "
                                          f"{scores[name]['radial_elongation']:.1f})"
                                          if scores[name]["class_shape"] else "")
                 for name in direct}),
                PLOTS / "direct.png")
        summary = {**scores, "points": len(labels), "classes": len(set(labels)),
                   "knn_k": cfg.knn_k,
                   "perplexity_used": embed_viz.perplexity_used(len(labels), cfg.perplexity)}
        outputs.write_json(paths.details(STAGE), summary)
        outputs.write_json(paths.timing(STAGE), timing)
        run.log_metrics(evaluation.flat_metrics(scores))
        run.log_metrics(timing)
        run.log_artifact(PLOTS)


def _score(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    outputs.run_main(main)
