"""Evaluation of the compared models (``compared.COMPARED_MODELS``: which checkpoint each uses and
how its embedding is computed) side by side.

Every vector is L2-normalised, so Euclidean distances lie in [0, 2] and rank like cosine
similarity, except a trained embedding with model.normalize false (the raw head output, compared
by Euclidean distance). Embeddings are computed once per model (``embed_models``) and reused by
every metric, figure and later stage.

Pair verification: fixed, seeded, balanced pairs from the val and test splits
(``evaluation_pairs``); the distance threshold is chosen on the val pairs and applied unchanged to
the test pairs (``verify``). Retrieval: every test image queries the gallery (the other test images,
or the train split) by exact Euclidean k-NN (``retrieve``), one chunk of queries at a time, so
memory is O(chunk x max_rank) and a gallery x gallery matrix is never formed. Similarity before
and after training: the cosine similarity of the same-class and of the different-class test pairs
(``metrics.cosine_separation``; its ``cosine_gap`` is the one number that says the embedding
separates classes). The metrics themselves are ``metrics``'s. Nothing here knows about
params.yaml or folders.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from sklearn.metrics import classification_report

from retrieval import metrics, rng, runtime, sampling, search
from retrieval.cache import ImageCache
from retrieval.compared import COMPARED_MODELS, ComparedModel, checkpoints
from retrieval.config import EvaluateConfig
from retrieval.embed import run_batched
from retrieval.models import EmbeddingNet
from retrieval.outputs import UserError, atomic_path, markdown_table, reading
from retrieval.plots import evaluation as evaluation_plots
from retrieval.plots.evaluation import Tile

FMRS = {"1e-2": 1e-2, "1e-3": 1e-3}  # false match rates at which FNMR is reported
RECALL_KS = metrics.RECALL_KS
SHOWN_NEIGHBORS = 10  # nearest neighbours kept per query for figures
# Sampler "epochs" of the evaluation pairs: fixed, and apart from training's validation pairs.
_PAIR_EPOCHS = {"val": 2_000_000, "test": 2_000_001}
_QUERY_CHUNK = 2048

# Metrics of the comparison table, in order, with the direction that is better.
COMPARED = {
    "accuracy": "higher", "precision": "higher", "recall": "higher", "f1": "higher",
    "tp": "higher", "tn": "higher", "fp": "lower", "fn": "lower", "roc_auc": "higher",
    "eer": "lower", **{f"fnmr_at_fmr_{name}": "lower" for name in FMRS}, "cosine_gap": "higher",
    "precision_at_1": "higher", "precision_at_5": "higher",
    **{f"recall_at_{k}": "higher" for k in RECALL_KS}, "map": "higher", "map_at_r": "higher",
}
WITH_CI = ("accuracy", "f1", "precision_at_1", "map")


# --------------------------------------------------------------------------- embeddings


@dataclass(frozen=True)
class Embeddings:
    """One model's embeddings of some rows of the split table: unit vectors, or the raw head
    output of a network trained with model.normalize false."""

    rows: np.ndarray  # (N,) int64: row numbers in the split table, increasing
    vectors: np.ndarray  # (N, D) float32
    labels: np.ndarray  # (N,) str: class names
    splits: np.ndarray  # (N,) str: train | val | test
    paths: np.ndarray  # (N,) str: image paths relative to the dataset root

    def __post_init__(self) -> None:
        if len(self.rows) != len(self.vectors) or (np.diff(self.rows) <= 0).any():
            raise ValueError("Embeddings.rows must be increasing, one per vector")

    def take(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """Vectors (len(rows), D) of these split-table rows."""
        rows = np.asarray(rows, dtype=np.int64)
        position = np.searchsorted(self.rows, rows)  # self.rows is sorted
        position = np.minimum(position, len(self.rows) - 1)
        missing = self.rows[position] != rows
        if missing.any():
            raise UserError(f"split-table row {int(rows[missing][0])} has no embedding: the "
                            "embeddings were computed for another split; re-run evaluate")
        return self.vectors[position]

    def subset(self, split: str) -> Embeddings:
        keep = self.splits == split
        return Embeddings(self.rows[keep], self.vectors[keep], self.labels[keep],
                          self.splits[keep], self.paths[keep])

    def save(self, path: str | Path) -> None:
        with atomic_path(path) as temp, open(temp, "wb") as stream:
            np.savez(stream, rows=self.rows, vectors=self.vectors, labels=self.labels,
                     splits=self.splits, paths=self.paths)

    @classmethod
    def load(cls, path: str | Path) -> Embeddings:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"embeddings file {path} does not exist: run `dvc repro evaluate`")
        with reading(path), np.load(path, allow_pickle=False) as stored:
            return cls(**{name: stored[name] for name in
                          ("rows", "vectors", "labels", "splits", "paths")})


def embed_models(nets: Mapping[str, EmbeddingNet], images: ImageCache, table: pd.DataFrame,
                 rows: np.ndarray, image_size: int, device: torch.device, precision: str,
                 compared: Sequence[ComparedModel] = COMPARED_MODELS) -> dict[str, Embeddings]:
    """Embeddings of these split-table rows for every compared model, keyed by model name.

    ``nets``: training stage -> its network (``checkpoints()`` lists the stages needed). A
    network's backbone runs once however many models use its features: with the default models
    train_frozen's pooled features are the baseline and its head maps them to the frozen
    embedding. ``images`` holds every row of ``table``.
    """
    rows = np.sort(np.asarray(rows, dtype=np.int64))
    prepared = {stage: runtime.prepare_model(nets[stage], device).eval()
                for stage in checkpoints(compared)}
    features: dict[str, np.ndarray] = {}

    def pooled(stage: str, model: str) -> np.ndarray:  # (N, C), once per network
        if stage not in features:
            net = prepared[stage]
            features[stage] = run_batched(net.features, images, rows, image_size, device,
                                          precision, net.normalization, desc=f"{model} features")
        return features[stage]

    columns = {name: table[name].to_numpy()[rows].astype(str) for name in
               ("label", "split", "path")}
    found = {}
    for model in compared:
        net = prepared[model.checkpoint]
        if model.view == "backbone":
            vectors = pooled(model.checkpoint, model.name)
        elif model.view == "head":
            vectors = _head(net, pooled(model.checkpoint, model.name), device)  # (N, D)
        else:  # "model" (checked by ComparedModel): the embedding itself
            vectors = run_batched(net, images, rows, image_size, device, precision,
                                  net.normalization, desc=f"{model.name} embeddings")
        # The backbone's pooled features are compared by cosine (unit rows); a trained
        # embedding as the network defines it (raw head output when model.normalize is false).
        unit = model.view == "backbone" or net.config.normalize
        vectors = metrics.l2_normalize(vectors) if unit else vectors.astype(np.float32)
        found[model.name] = Embeddings(rows, vectors, columns["label"], columns["split"],
                                       columns["path"])
    return found


def _head(net: EmbeddingNet, features: np.ndarray, device: torch.device) -> np.ndarray:
    """The head on precomputed pooled features, in float32, (N, C) -> (N, D)."""
    with torch.inference_mode():
        head = [net.project(torch.from_numpy(chunk).to(device)).float().cpu()
                for chunk in np.array_split(features, max(1, len(features) // 4096 + 1))]
    return torch.cat(head).numpy()


# --------------------------------------------------------------------------- what is scored


def evaluation_pairs(table: pd.DataFrame, val_pairs: int, test_pairs: int,
                     seed: int) -> pd.DataFrame:
    """Seeded balanced pairs (half same-class) of val images and of test images.

    Columns: split, i, j (split-table rows), same (1 = same class), path_i, path_j. The same
    seed and split table always give the same pairs, so every experiment is scored on them.
    """
    parts = []
    for split, n_pairs in (("val", val_pairs), ("test", test_pairs)):
        rows = np.flatnonzero(table["split"].to_numpy() == split)
        labels = table["label"].to_numpy()[rows]
        try:
            pairs = sampling.sample_pairs(labels, n_pairs, seed, _PAIR_EPOCHS[split])
        except ValueError as error:
            raise UserError(f"cannot draw evaluation pairs from the {split} split "
                            f"({len(rows)} images): {error}") from error
        i, j = rows[pairs[:, 0]], rows[pairs[:, 1]]
        parts.append(pd.DataFrame({
            "split": split, "i": i, "j": j, "same": pairs[:, 2],
            "path_i": table["path"].to_numpy()[i], "path_j": table["path"].to_numpy()[j]}))
    return pd.concat(parts, ignore_index=True)


def query_gallery(table: pd.DataFrame, gallery: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(queries, gallery): every test image queries the other test images or the train split.

    Both tables have columns row (split-table row), path, label and file.
    """
    def rows_of(split: str) -> pd.DataFrame:
        part = table[table["split"] == split]
        return pd.DataFrame({"row": part.index.to_numpy(np.int64), "path": part["path"],
                             "label": part["label"], "file": part["file"]}).reset_index(drop=True)

    queries = rows_of("test")
    items = rows_of(gallery)
    if len(queries) < 2:
        raise UserError(f"the test split has {len(queries)} image(s): retrieval needs >= 2")
    if not queries["label"].isin(set(items["label"])).any():
        raise UserError(f"evaluate.gallery is '{gallery}' but no test class occurs there "
                        "(class-disjoint split?): set evaluate.gallery: test in params.yaml")
    return queries, items


# --------------------------------------------------------------------------- pair verification


@dataclass
class Verification:
    metrics: dict[str, float | int]
    val_distances: np.ndarray  # (P_val,)
    test_distances: np.ndarray  # (P_test,)
    test_same: np.ndarray  # (P_test,) 0/1
    fpr: np.ndarray  # ROC on the test pairs
    tpr: np.ndarray
    report: dict  # scikit-learn's classification_report(output_dict=True)
    report_text: str


def _pair_distances(embeddings: Embeddings, pairs: pd.DataFrame) -> np.ndarray:
    """Euclidean distance between the two embeddings of every pair, (P,)."""
    return metrics.pair_distances(embeddings.take(pairs["i"]), embeddings.take(pairs["j"]))


def verify(val_distances: np.ndarray, val_same: np.ndarray, test_distances: np.ndarray,
           test_same: np.ndarray, criterion: str, n_boot: int, seed: int) -> Verification:
    """Threshold chosen on the val pairs, applied unchanged to the test pairs, and scored there."""
    threshold = metrics.choose_threshold(val_distances, val_same, criterion)
    same = np.asarray(test_same).astype(int)
    predicted = (np.asarray(test_distances) <= threshold).astype(int)
    scores: dict[str, float | int] = {"threshold": threshold,
                                      **metrics.verification_scores(same, predicted)}
    curve = metrics.roc(test_distances, same)
    scores["roc_auc"] = curve["auc"]
    scores["eer"] = metrics.equal_error_rate(test_distances, same)
    for name, fmr in FMRS.items():
        scores[f"fnmr_at_fmr_{name}"] = metrics.fnmr_at_fmr(test_distances, same, fmr)
    if n_boot:
        correct = (same == predicted).astype(np.float64)
        scores["accuracy_ci_low"], scores["accuracy_ci_high"] = metrics.bootstrap_ci(
            correct, n_boot, seed)
        scores["f1_ci_low"], scores["f1_ci_high"] = metrics.bootstrap_f1_ci(
            same, predicted, n_boot, seed)
        scores["roc_auc_ci_low"], scores["roc_auc_ci_high"] = metrics.bootstrap_auc_ci(
            test_distances, same, n_boot, seed)
    kwargs = {"labels": [1, 0], "target_names": ["same", "different"], "zero_division": 0}
    return Verification(
        scores, np.asarray(val_distances), np.asarray(test_distances), same, curve["fpr"],
        curve["tpr"], classification_report(same, predicted, output_dict=True, **kwargs),
        classification_report(same, predicted, digits=4, **kwargs))


# --------------------------------------------------------------------------- retrieval


@dataclass
class Retrieval:
    per_query: pd.DataFrame  # one row per query; AP columns NaN where nothing is relevant
    neighbors: np.ndarray  # (Q, <= SHOWN_NEIGHBORS) gallery positions, nearest first
    distances: np.ndarray  # (Q, <= SHOWN_NEIGHBORS)
    ranks: int  # neighbours ranked per query


def retrieve(queries: np.ndarray, query_labels: np.ndarray, gallery: np.ndarray,
             gallery_labels: np.ndarray, same_set: bool, max_rank: int,
             chunk_size: int = _QUERY_CHUNK) -> Retrieval:
    """Rank the gallery for every query by exact Euclidean distance and score each ranking.

    ``same_set``: the queries *are* the gallery (row q of ``queries`` is gallery item q), so each
    query's own entry is left out of its ranking and of its relevant count. ``per_query`` holds
    the query's label and ``metrics.per_query_retrieval``'s scores; ``metrics.retrieval_metrics``
    of it is the model's summary.
    """
    # Integer class codes: a (chunk, max_rank) matrix of label strings would be 10-100x bigger.
    _, codes = np.unique(np.concatenate([np.asarray(query_labels), np.asarray(gallery_labels)]),
                         return_inverse=True)
    query_codes, gallery_codes = codes[:len(query_labels)], codes[len(query_labels):]
    n = len(gallery)
    ranks = min(max_rank, n - int(same_set))
    if ranks < 1:
        raise UserError(f"the gallery has {n} item(s): no neighbour to rank")
    n_relevant = metrics.count_relevant(query_codes, gallery_codes, exclude_self=same_set)
    parts, shown, shown_distances = [], [], []
    for start, distances, indices in search.iter_knn(queries, gallery, ranks, same_set,
                                                     chunk_size):
        stop = start + len(indices)
        parts.append(pd.DataFrame(metrics.per_query_retrieval(
            gallery_codes[indices], query_codes[start:stop], n_relevant[start:stop],
            RECALL_KS)))
        shown.append(indices[:, :SHOWN_NEIGHBORS])
        shown_distances.append(distances[:, :SHOWN_NEIGHBORS])
    per_query = pd.concat(parts, ignore_index=True)
    per_query.insert(0, "label", np.asarray(query_labels))
    return Retrieval(per_query, np.concatenate(shown), np.concatenate(shown_distances), ranks)


# --------------------------------------------------------------------------- one model, all


@dataclass
class ModelResult:
    metrics: dict  # the model's entry in metrics/details/evaluate.json
    verification: Verification
    retrieval: Retrieval
    test_similarities: np.ndarray  # (P_test,) cosine similarity of each test pair


def evaluate_model(embeddings: Embeddings, pairs: pd.DataFrame, queries: pd.DataFrame,
                   gallery: pd.DataFrame, cfg: EvaluateConfig, seed: int) -> ModelResult:
    """Pair verification and retrieval of one model, with bootstrap CIs and worst classes, and
    the cosine similarity of its same-class vs different-class test pairs
    (``metrics.cosine_separation``: the vectors are normalised there, whatever their length)."""
    val, test = pairs[pairs["split"] == "val"], pairs[pairs["split"] == "test"]
    test_i, test_j = embeddings.take(test["i"]), embeddings.take(test["j"])
    verification = verify(_pair_distances(embeddings, val), val["same"].to_numpy(),
                          _pair_distances(embeddings, test), test["same"].to_numpy(),
                          cfg.threshold_criterion, cfg.bootstrap, seed)
    same_set = cfg.gallery == "test"
    retrieval = retrieve(embeddings.take(queries["row"]), queries["label"].to_numpy(),
                         embeddings.take(gallery["row"]), gallery["label"].to_numpy(),
                         same_set, cfg.max_rank)
    scores = {**verification.metrics, **metrics.retrieval_metrics(retrieval.per_query),
              **metrics.cosine_separation(test_i, test_j, test["same"].to_numpy()),
              "embedding_dim": int(embeddings.vectors.shape[1]), "ranks": retrieval.ranks}
    scored = _scored(retrieval.per_query)
    if cfg.bootstrap:
        for name, column in (("precision_at_1", "precision_at_1"),
                             ("precision_at_5", "precision_at_5"), ("map", "ap"),
                             ("map_at_r", "ap_at_r")):
            low, high = metrics.bootstrap_ci(scored[column].to_numpy(), cfg.bootstrap, seed)
            scores[f"{name}_ci_low"], scores[f"{name}_ci_high"] = low, high
    per_class = _per_class_precision_at_1(scored).sort_values(kind="stable")
    scores["worst_classes"] = per_class.index[:5].tolist()
    return ModelResult(scores, verification, retrieval,
                       metrics.pair_cosine_similarities(test_i, test_j))


def _scored(per_query: pd.DataFrame) -> pd.DataFrame:
    """The queries that have a relevant gallery item: the ones every metric is averaged over."""
    return per_query[per_query["n_relevant"] > 0]


def _per_class_precision_at_1(scored: pd.DataFrame) -> pd.Series:
    """Mean precision@1 of the scored queries of each class, indexed by class (sorted)."""
    return scored.groupby("label")["precision_at_1"].mean()


# --------------------------------------------------------------------------- tables


def comparison_table(results: dict[str, dict]) -> pd.DataFrame:
    """Every pair and retrieval metric for each model, and the differences between them.

    ``results``: model name -> its metrics, in ``COMPARED_MODELS`` order. Rows: metrics;
    columns: metric, better (higher | lower), one per model, then every model minus each model
    before it (frozen - baseline, unfrozen - baseline, unfrozen - frozen).
    """
    table = pd.DataFrame({"metric": list(COMPARED), "better": list(COMPARED.values())})
    for model in results:
        table[model] = [results[model].get(name, np.nan) for name in COMPARED]
    names = list(results)
    for position, a in enumerate(names):
        for b in names[:position]:
            table[f"{a} - {b}"] = table[a] - table[b]
    return table


def comparison_markdown(table: pd.DataFrame, results: dict[str, dict]) -> str:
    """The comparison table as Markdown, with 95% bootstrap CIs where computed; a compared
    model's column is headed by its label."""
    models = [m for m in results if m in table]

    def cell(metric: str, value: float, model: str | None = None, signed: bool = False) -> str:
        if pd.isna(value):
            return ""
        if metric in ("tp", "tn", "fp", "fn"):
            return f"{value:+.0f}" if signed else f"{value:.0f}"
        text = f"{value:+.4f}" if signed else f"{value:.4f}"
        low = results.get(model, {}).get(f"{metric}_ci_low") if model else None
        if low is not None:
            text += f" [{low:.3f}, {results[model][f'{metric}_ci_high']:.3f}]"
        return text

    deltas = [c for c in table.columns if " - " in c]
    labels = {model.name: model.label for model in COMPARED_MODELS}
    header = ["metric", "better", *[labels.get(m, m) for m in models], *deltas]
    return markdown_table(header, (
        [row["metric"], row["better"], *[cell(row["metric"], row[m], m) for m in models],
         *[cell(row["metric"], row[d], signed=True) for d in deltas]]
        for _, row in table.iterrows()))


def per_class_table(results: dict[str, ModelResult]) -> pd.DataFrame:
    """Precision@1 per query class and model, worst (under the last model) first."""
    columns = {}
    for model, result in results.items():
        scored = _scored(result.retrieval.per_query)
        columns[model] = _per_class_precision_at_1(scored)
        columns["queries"] = scored.groupby("label").size()
    table = pd.DataFrame(columns).rename_axis("class").reset_index()
    table = table[["class", "queries", *results]]
    return table.sort_values([list(results)[-1], "class"], kind="stable").reset_index(drop=True)


def roc_table(results: dict[str, ModelResult]) -> pd.DataFrame:
    """ROC points of every model on the test pairs: columns model, fpr, tpr."""
    return pd.concat([pd.DataFrame({"model": model, "fpr": r.verification.fpr,
                                    "tpr": r.verification.tpr})
                      for model, r in results.items()], ignore_index=True)


def classification_reports(results: dict[str, ModelResult]) -> tuple[str, dict]:
    """scikit-learn's classification reports of every model: (text, JSON-ready dict)."""
    text = "".join(f"== {model} (test pairs, threshold {r.metrics['threshold']:.4f} from val)\n"
                   f"{r.verification.report_text}\n" for model, r in results.items())
    return text, {model: r.verification.report for model, r in results.items()}


def worst_queries(per_query: pd.DataFrame, count: int) -> np.ndarray:
    """Query positions with the lowest AP (ties: wrong first neighbour first, then position)."""
    order = _scored(per_query).sort_values(["ap", "precision_at_1"], kind="stable")
    return order.index.to_numpy()[:count]


def flat_metrics(results: dict[str, dict]) -> dict[str, float]:
    """{'unfrozen': {'map': 0.5}} -> {'unfrozen.map': 0.5}, numbers only (for MLflow)."""
    return {f"{model}.{name}": value for model, scores in results.items()
            for name, value in scores.items()
            if isinstance(value, int | float) and not isinstance(value, bool)}


# --------------------------------------------------------------------------- figures


def _short(label: str, width: int = 16) -> str:
    return label if len(label) <= width else label[:width - 1] + "…"


def thumbnail(images: ImageCache, row: int) -> np.ndarray:
    """The cached uint8 image of a split-table row as (H, W, 3)."""
    return images[int(row)].permute(1, 2, 0).numpy()


def retrieval_rows(images: ImageCache, queries: pd.DataFrame, gallery: pd.DataFrame,
                   retrievals: dict[str, Retrieval], positions: np.ndarray, k: int = 5,
                   query_notes: dict[int, str] | None = None) -> list[list[Tile]]:
    """Grid rows: each query, then its top-k gallery images under each model in turn."""
    rows = []
    for q in positions:
        label = queries["label"].iat[q]
        note = f"\n{query_notes[q]}" if query_notes and q in query_notes else ""
        row = [Tile(thumbnail(images, queries["row"].iat[q]), f"query: {_short(label)}{note}")]
        for retrieval in retrievals.values():
            for g, d in zip(retrieval.neighbors[q, :k], retrieval.distances[q, :k], strict=True):
                found = gallery["label"].iat[g]
                row.append(Tile(thumbnail(images, gallery["row"].iat[g]),
                                f"{_short(found)}\nd={d:.3f}", correct=bool(found == label)))
        rows.append(row)
    return rows


def figures(results: dict[str, ModelResult], images: ImageCache, queries: pd.DataFrame,
            gallery: pd.DataFrame, examples: int, seed: int) -> dict[str, plt.Figure]:
    """Every figure of the evaluate stage, keyed by name."""
    scores = {model: r.metrics for model, r in results.items()}
    first, last = list(results)[0], list(results)[-1]
    shown = list(dict.fromkeys((first, last)))  # before training and the last trained model
    picks = rng.subsample(len(queries), examples, seed, rng.Subsample.RETRIEVAL_EXAMPLES)
    worst = worst_queries(results[last].retrieval.per_query, examples)
    ap = results[last].retrieval.per_query["ap"]
    k = min(5, results[last].retrieval.neighbors.shape[1])
    titles = ["query", *[f"{m} #{i + 1}" for m in shown for i in range(k)]]
    return {
        "confusion_matrix": evaluation_plots.confusion_matrices(scores),
        "roc": evaluation_plots.roc_curves(roc_table(results),
                                           {m: s["roc_auc"] for m, s in scores.items()}),
        "distance_histograms": evaluation_plots.distance_histograms(
            {m: (r.verification.test_distances, r.verification.test_same)
             for m, r in results.items()}, {m: s["threshold"] for m, s in scores.items()}),
        "similarity": evaluation_plots.similarity_histograms(
            {m: (r.test_similarities, r.verification.test_same) for m, r in results.items()},
            scores),
        "retrieval_examples": evaluation_plots.retrieval_grid(
            retrieval_rows(images, queries, gallery,
                           {m: results[m].retrieval for m in shown}, picks, k),
            titles, f"Example test queries and their top-{k}: {' vs '.join(shown)}",
            gaps_after=tuple(k * i for i in range(len(shown)))),
        "worst_queries": evaluation_plots.retrieval_grid(
            retrieval_rows(images, queries, gallery, {last: results[last].retrieval}, worst, k,
                           {int(q): f"AP {ap.iat[q]:.2f}" for q in worst}),
            ["query", *[f"{last} #{i + 1}" for i in range(k)]],
            f"The {len(worst)} worst test queries of the {last} model (lowest average precision)",
            gaps_after=(0,)),
    }

