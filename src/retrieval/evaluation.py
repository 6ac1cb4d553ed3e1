"""Evaluation of three models side by side: the baseline, train_frozen's and train_unfrozen's.

    baseline  the pooled backbone descriptor before any training. train_frozen never updates its
              trunk (nor its BatchNorm statistics), so its trunk *is* the untrained (or
              ImageNet-pretrained) backbone. With GeM pooling the pool's p is train_frozen's.
    frozen    train_frozen's embedding (trained head on the frozen backbone)
    unfrozen  train_unfrozen's embedding (fine-tuned backbone and head)

Every vector is L2-normalised, so Euclidean distances lie in [0, 2] and rank like cosine
similarity. Embeddings are computed once per model (``embed_models``) and reused by every
metric, figure and later stage.

Pair verification: fixed, seeded, balanced pairs from the val and test splits
(``evaluation_pairs``); the distance threshold is chosen on the val pairs and applied unchanged to
the test pairs (``verify``). Retrieval: every test image queries the gallery (the other test images,
or the train split) by exact Euclidean k-NN (``retrieve``), one chunk of queries at a time, so
memory is O(chunk x max_rank) and a gallery x gallery matrix is never formed.

The same module holds the 2-D projections and separation score of the embed_viz stage
(``subsample``, ``project_2d``, ``silhouette``). Nothing here knows about params.yaml or folders.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from sklearn.metrics import classification_report

from retrieval import metrics, runtime, sampling, search
from retrieval.cache import ImageCache
from retrieval.config import EvaluateConfig
from retrieval.embed import run_batched
from retrieval.models import EmbeddingNet
from retrieval.outputs import UserError, atomic_path
from retrieval.plots import evaluation as evaluation_plots
from retrieval.plots.evaluation import Tile

MODELS = ("baseline", "frozen", "unfrozen")
FMRS = {"1e-2": 1e-2, "1e-3": 1e-3}  # false match rates at which FNMR is reported
RECALL_KS = (1, 5, 10)
SHOWN_NEIGHBORS = 10  # nearest neighbours kept per query for figures
# Sampler "epochs" of the evaluation pairs: fixed, and apart from training's validation pairs.
_PAIR_EPOCHS = {"val": 2_000_000, "test": 2_000_001}
_QUERY_CHUNK = 2048
_BOOTSTRAP_BLOCK_ELEMENTS = 1 << 22

# Metrics of the comparison table, in order, with the direction that is better.
COMPARED = {
    "accuracy": "higher", "precision": "higher", "recall": "higher", "f1": "higher",
    "tp": "higher", "tn": "higher", "fp": "lower", "fn": "lower", "roc_auc": "higher",
    "eer": "lower", **{f"fnmr_at_fmr_{name}": "lower" for name in FMRS},
    "precision_at_1": "higher", "precision_at_5": "higher",
    **{f"recall_at_{k}": "higher" for k in RECALL_KS}, "map": "higher", "map_at_r": "higher",
}
WITH_CI = ("accuracy", "f1", "precision_at_1", "map")


# --------------------------------------------------------------------------- embeddings


@dataclass(frozen=True)
class Embeddings:
    """One model's L2-normalised vectors of some rows of the split table."""

    rows: np.ndarray  # (N,) int64: row numbers in the split table, increasing
    vectors: np.ndarray  # (N, D) float32, unit length
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
        with np.load(path, allow_pickle=False) as stored:
            return cls(**{name: stored[name] for name in
                          ("rows", "vectors", "labels", "splits", "paths")})


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True).clip(1e-12)


def embed_models(frozen: EmbeddingNet, unfrozen: EmbeddingNet, images: ImageCache,
                 table: pd.DataFrame, rows: np.ndarray, image_size: int, device: torch.device,
                 precision: str) -> dict[str, Embeddings]:
    """Embeddings of these split-table rows for the baseline, frozen and unfrozen models.

    The backbone of train_frozen runs once: its pooled features are the baseline and its head
    maps them to the frozen embedding. ``images`` holds every row of ``table``.
    """
    rows = np.sort(np.asarray(rows, dtype=np.int64))
    frozen = runtime.prepare_model(frozen, device).eval()
    unfrozen = runtime.prepare_model(unfrozen, device).eval()
    features = run_batched(frozen.features, images, rows, image_size, device, precision,
                           frozen.normalization, desc="baseline features")  # (N, C)
    with torch.inference_mode():
        head = [frozen.project(torch.from_numpy(chunk).to(device)).float().cpu()
                for chunk in np.array_split(features, max(1, len(features) // 4096 + 1))]
    learned = torch.cat(head).numpy()  # (N, D)
    tuned = run_batched(unfrozen, images, rows, image_size, device, precision,
                        unfrozen.normalization, desc="unfrozen embeddings")  # (N, D), already unit length
    columns = {name: table[name].to_numpy()[rows].astype(str) for name in
               ("label", "split", "path")}
    return {name: Embeddings(rows, l2_normalize(vectors), columns["label"], columns["split"],
                             columns["path"])
            for name, vectors in (("baseline", features), ("frozen", learned),
                                  ("unfrozen", tuned))}


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


def pair_distances(embeddings: Embeddings, pairs: pd.DataFrame) -> np.ndarray:
    """Euclidean distance between the two (unit) embeddings of every pair, (P,)."""
    a, b = embeddings.take(pairs["i"]), embeddings.take(pairs["j"])
    return np.linalg.norm(a - b, axis=1).astype(np.float64)


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
        scores["f1_ci_low"], scores["f1_ci_high"] = bootstrap_f1_ci(same, predicted, n_boot, seed)
    kwargs = {"labels": [1, 0], "target_names": ["same", "different"], "zero_division": 0}
    return Verification(
        scores, np.asarray(val_distances), np.asarray(test_distances), same, curve["fpr"],
        curve["tpr"], classification_report(same, predicted, output_dict=True, **kwargs),
        classification_report(same, predicted, digits=4, **kwargs))


def bootstrap_f1_ci(same: np.ndarray, predicted: np.ndarray, n_boot: int = 1000, seed: int = 0,
                    alpha: float = 0.05) -> tuple[float, float]:
    """Percentile bootstrap interval of F1 over resampled pairs (F1 is not a mean of per-pair
    values, so ``metrics.bootstrap_ci`` does not apply); the threshold stays fixed."""
    same, predicted = np.asarray(same).astype(bool), np.asarray(predicted).astype(bool)
    tp, fp, fn = same & predicted, ~same & predicted, same & ~predicted
    rng = np.random.default_rng(seed)
    n = same.size
    block = max(1, _BOOTSTRAP_BLOCK_ELEMENTS // n)
    values = []
    for start in range(0, n_boot, block):
        draw = rng.integers(0, n, size=(min(block, n_boot - start), n))  # (B, n)
        n_tp, n_fp, n_fn = tp[draw].sum(1), fp[draw].sum(1), fn[draw].sum(1)
        denominator = 2 * n_tp + n_fp + n_fn
        values.append(np.where(denominator > 0, 2 * n_tp / np.maximum(denominator, 1), 0.0))
    low, high = np.quantile(np.concatenate(values), [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


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
    query's own entry is left out of its ranking and of its relevant count. Each query gets
    ``n_relevant``, ``precision_at_1``, ``precision_at_5``, ``recall_at_{1,5,10}`` (at least one
    relevant item in the top k), ``ap`` and ``ap_at_r`` (see ``metrics``) and ``found_all`` (all
    relevant items ranked, i.e. its AP is exact, not AP@max_rank).
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
    for start in range(0, len(queries), chunk_size):
        stop = min(start + chunk_size, len(queries))
        distances, indices = search.knn(queries[start:stop], gallery, ranks + int(same_set))
        if same_set:
            distances, indices = _drop_own(distances, indices, np.arange(start, stop), ranks)
        labels = gallery_codes[indices]  # (C, K)
        own, counts = query_codes[start:stop], n_relevant[start:stop]
        relevant = labels == own[:, None]  # (C, K)
        part = {"n_relevant": counts,
                "precision_at_1": metrics.per_query_precision_at_1(labels, own),
                "precision_at_5": relevant[:, :5].mean(axis=1)}
        for k in RECALL_KS:
            part[f"recall_at_{k}"] = relevant[:, :k].any(axis=1).astype(np.float64)
        part["ap"] = metrics.per_query_average_precision(labels, own, counts)
        part["ap_at_r"] = metrics.per_query_average_precision(labels, own, counts, at_r=True)
        part["found_all"] = relevant.sum(axis=1) == counts
        parts.append(pd.DataFrame(part))
        shown.append(indices[:, :SHOWN_NEIGHBORS])
        shown_distances.append(distances[:, :SHOWN_NEIGHBORS])
    per_query = pd.concat(parts, ignore_index=True)
    per_query.insert(0, "label", np.asarray(query_labels))
    return Retrieval(per_query, np.concatenate(shown), np.concatenate(shown_distances), ranks)


def _drop_own(distances: np.ndarray, indices: np.ndarray, own: np.ndarray,
              width: int) -> tuple[np.ndarray, np.ndarray]:
    """Remove each query's own gallery index from its k+1 results (by index, not by rank: a
    duplicate image may tie at distance 0); if it is absent, the last result goes instead."""
    mask = indices == own[:, None]  # (C, k+1)
    mask[~mask.any(axis=1), -1] = True
    keep = ~mask
    return distances[keep].reshape(-1, width), indices[keep].reshape(-1, width)


def retrieval_summary(per_query: pd.DataFrame) -> dict[str, float | int | bool]:
    """Means over the queries that have a relevant gallery item (like metrics.retrieval_metrics)."""
    scored = per_query[per_query["n_relevant"] > 0]
    if scored.empty:
        raise UserError("no query has a relevant gallery item: queries and gallery share no class")
    summary: dict[str, float | int | bool] = {
        name: float(scored[name].mean()) for name in
        ("precision_at_1", "precision_at_5", *[f"recall_at_{k}" for k in RECALL_KS])}
    summary["map"] = float(scored["ap"].mean())
    summary["map_at_r"] = float(scored["ap_at_r"].mean())
    summary["map_exact"] = bool(scored["found_all"].all())
    summary["n_queries"] = len(scored)
    summary["n_queries_without_relevant"] = len(per_query) - len(scored)
    return summary


# --------------------------------------------------------------------------- one model, all


@dataclass
class ModelResult:
    metrics: dict  # the model's entry in metrics/evaluate.json
    verification: Verification
    retrieval: Retrieval


def evaluate_model(embeddings: Embeddings, pairs: pd.DataFrame, queries: pd.DataFrame,
                   gallery: pd.DataFrame, cfg: EvaluateConfig, seed: int) -> ModelResult:
    """Pair verification and retrieval of one model, with bootstrap CIs and worst classes."""
    val, test = pairs[pairs["split"] == "val"], pairs[pairs["split"] == "test"]
    verification = verify(pair_distances(embeddings, val), val["same"].to_numpy(),
                          pair_distances(embeddings, test), test["same"].to_numpy(),
                          cfg.threshold_criterion, cfg.bootstrap, seed)
    same_set = cfg.gallery == "test"
    retrieval = retrieve(embeddings.take(queries["row"]), queries["label"].to_numpy(),
                         embeddings.take(gallery["row"]), gallery["label"].to_numpy(),
                         same_set, cfg.max_rank)
    scores = {**verification.metrics, **retrieval_summary(retrieval.per_query),
              "embedding_dim": int(embeddings.vectors.shape[1]), "ranks": retrieval.ranks}
    scored = retrieval.per_query[retrieval.per_query["n_relevant"] > 0]
    if cfg.bootstrap:
        for name, column in (("precision_at_1", "precision_at_1"), ("map", "ap")):
            low, high = metrics.bootstrap_ci(scored[column].to_numpy(), cfg.bootstrap, seed)
            scores[f"{name}_ci_low"], scores[f"{name}_ci_high"] = low, high
    per_class = scored.groupby("label")["precision_at_1"].mean().sort_values(kind="stable")
    scores["worst_classes"] = per_class.index[:5].tolist()
    return ModelResult(scores, verification, retrieval)


# --------------------------------------------------------------------------- tables


def comparison_table(results: dict[str, dict]) -> pd.DataFrame:
    """Every pair and retrieval metric for each model, and the differences between them.

    ``results``: model name -> its metrics. Rows: metrics; columns: metric, better
    (higher | lower), one per model, then frozen-baseline, unfrozen-baseline, unfrozen-frozen.
    """
    table = pd.DataFrame({"metric": list(COMPARED), "better": list(COMPARED.values())})
    for model in results:
        table[model] = [results[model].get(name, np.nan) for name in COMPARED]
    for a, b in (("frozen", "baseline"), ("unfrozen", "baseline"), ("unfrozen", "frozen")):
        if a in results and b in results:
            table[f"{a} - {b}"] = table[a] - table[b]
    return table


def comparison_markdown(table: pd.DataFrame, results: dict[str, dict]) -> str:
    """The comparison table as Markdown, with 95% bootstrap CIs where computed."""
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
    header = ["metric", "better", *models, *deltas]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, row in table.iterrows():
        cells = [row["metric"], row["better"],
                 *[cell(row["metric"], row[m], m) for m in models],
                 *[cell(row["metric"], row[d], signed=True) for d in deltas]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def per_class_table(results: dict[str, ModelResult]) -> pd.DataFrame:
    """Precision@1 per query class and model, worst (under the last model) first."""
    columns = {}
    for model, result in results.items():
        per_query = result.retrieval.per_query
        scored = per_query[per_query["n_relevant"] > 0]
        columns[model] = scored.groupby("label")["precision_at_1"].mean()
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


def example_queries(n_queries: int, count: int, seed: int) -> np.ndarray:
    """A seeded choice of query positions to show, sorted."""
    rng = np.random.default_rng([seed, 7])
    return np.sort(rng.choice(n_queries, size=min(count, n_queries), replace=False))


def worst_queries(per_query: pd.DataFrame, count: int) -> np.ndarray:
    """Query positions with the lowest AP (ties: wrong first neighbour first, then position)."""
    scored = per_query[per_query["n_relevant"] > 0]
    order = scored.sort_values(["ap", "precision_at_1"], kind="stable")
    return order.index.to_numpy()[:count]


def flat_metrics(results: dict[str, dict]) -> dict[str, float]:
    """{'unfrozen': {'map': 0.5}} -> {'unfrozen.map': 0.5}, numbers only (for MLflow)."""
    return {f"{model}.{name}": value for model, scores in results.items()
            for name, value in scores.items()
            if isinstance(value, int | float) and not isinstance(value, bool)}


def file_digest(path: str | Path) -> str:
    """Short SHA-256 of a file: ties a saved index to the checkpoint that embedded it."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def index_card(model_path: str | Path, dim: int, items: int) -> dict:
    """What `retrieval search` needs to know about a saved gallery index."""
    return {"model": Path(model_path).as_posix(), "model_sha256": file_digest(model_path),
            "dim": dim, "items": items,
            "distance": "Euclidean between L2-normalised embeddings"}


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
    shown = list(dict.fromkeys(m for m in ("baseline", list(results)[-1]) if m in results))
    picks = example_queries(len(queries), examples, seed)
    last = list(results)[-1]
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


# --------------------------------------------------------------------------- embed_viz


def load_split_embeddings(paths: dict[str, str | Path], split: str) -> dict[str, Embeddings]:
    """Each model's saved embeddings of one split; they must cover the same images in order."""
    loaded = {name: Embeddings.load(path).subset(split) for name, path in paths.items()}
    first_name, first = next(iter(loaded.items()))
    if len(first.rows) < 3:
        raise UserError(f"{paths[first_name]} holds {len(first.rows)} {split} image(s): "
                        "need >= 3 to project")
    for name, other in loaded.items():
        if not np.array_equal(other.rows, first.rows):
            raise UserError(f"{paths[name]} and {paths[first_name]} embed different images: "
                            "re-run evaluate")
    return loaded


def subsample(n: int, max_points: int, seed: int) -> np.ndarray:
    """At most ``max_points`` of ``n`` positions, a seeded uniform choice, sorted."""
    if n <= max_points:
        return np.arange(n)
    return np.sort(np.random.default_rng([seed, 11]).choice(n, size=max_points, replace=False))


def highlighted_classes(labels: np.ndarray, count: int) -> list[str]:
    """The ``count`` largest classes (ties broken by name): the ones a scatter plot colours."""
    sizes = pd.Series(labels).value_counts()
    frame = pd.DataFrame({"label": sizes.index.astype(str), "size": sizes.to_numpy()})
    return frame.sort_values(["size", "label"], ascending=[False, True],
                             kind="stable")["label"].head(count).tolist()


def project_2d(vectors: np.ndarray, method: str, seed: int,
               perplexity: float = 30.0) -> np.ndarray:
    """(N, 2) coordinates by PCA or t-SNE (seeded, PCA-initialised, on <= 50 PCA dimensions).

    t-SNE's perplexity is capped at (N - 1) / 3 so small samples still work.
    """
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    vectors = np.asarray(vectors, dtype=np.float64)
    if len(vectors) < 3:
        raise UserError(f"a 2-D projection needs >= 3 points, found {len(vectors)}")
    if method == "pca":
        return PCA(n_components=2, random_state=seed).fit_transform(vectors)
    if method != "tsne":
        raise ValueError(f"method must be 'pca' or 'tsne', found {method!r}")
    if vectors.shape[1] > 50:  # the usual speed-up: t-SNE on the top principal components
        vectors = PCA(n_components=min(50, len(vectors)), random_state=seed).fit_transform(vectors)
    tsne = TSNE(n_components=2, perplexity=min(perplexity, (len(vectors) - 1) / 3),
                init="pca", learning_rate="auto", random_state=seed, n_jobs=1)
    return tsne.fit_transform(vectors)


def silhouette(vectors: np.ndarray, labels: np.ndarray) -> float | None:
    """Silhouette score of the classes in embedding space (Euclidean); None if undefined."""
    from sklearn.metrics import silhouette_score

    n_classes = len(np.unique(labels))
    if not 2 <= n_classes <= len(labels) - 1:
        return None
    return float(silhouette_score(vectors, labels, metric="euclidean"))
