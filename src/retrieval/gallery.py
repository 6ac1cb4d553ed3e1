"""A saved, searchable gallery: a FAISS index, its manifest and its card, under one file stem.

``NAME.faiss`` is the index (exact ``IndexFlatL2`` unless an approximate one was asked for),
``NAME.csv`` the manifest, one row per index id in id order (``path`` as shown to users,
``label`` or '', ``file`` a path the process can open, ``content_hash`` as
``data.content_hash``), ``NAME.json`` the card (``card``: the model and its SHA-256, dim, items,
distance, the index factory string and its tuned search parameters, image size, threshold).
`retrieval index` writes one for any folder, evaluate one for its test gallery; `retrieval
search` and `retrieval serve` read them with ``load``.

``save`` writes the three files together (each to a temporary name, renamed only when all three
are written), and ``load`` checks that they belong together, so a reader never mixes an index
with another one's manifest. Every problem is a one-line ``UserError`` naming the file.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from retrieval import outputs, search
from retrieval.outputs import UserError

if TYPE_CHECKING:
    import faiss

COLUMNS = ("path", "label", "file", "content_hash")
DISTANCE = "Euclidean between L2-normalised embeddings"
TUNING_QUERIES = 1000  # gallery items that tune nprobe/efSearch (exact search answers them too)
TUNING_K = 10


@dataclass
class Gallery:
    """An index with its manifest (one row per id) and card, as ``load`` returns them."""

    index: faiss.Index
    manifest: pd.DataFrame
    card: dict

    def search(self, vector: np.ndarray, k: int, query_hash: str | None = None,
               exclude_self: bool = False) -> pd.DataFrame:
        """The k nearest items of one embedding (D,) or (1, D), nearest first: rank, id, path,
        label, file, distance and ``same_image`` (the item's content hash is ``query_hash``:
        the query itself, whatever its path). ``exclude_self`` drops those rows and still
        returns k when the gallery has them. The card's search parameters are used."""
        vector = np.asarray(vector, dtype=np.float32).reshape(1, -1)
        hashes = self.manifest["content_hash"]
        copies = int((hashes == query_hash).sum()) if query_hash and exclude_self else 0
        try:
            distances, ids = search.search_index(self.index, vector, k + copies,
                                                 params=self.card.get("search_params") or None)
        except ValueError as error:
            raise UserError(str(error)) from None
        found = ids[0] >= 0  # an approximate index may find fewer than k
        rows = self.manifest.iloc[ids[0][found]].reset_index(drop=True)
        table = pd.DataFrame({"id": ids[0][found], "path": rows["path"], "label": rows["label"],
                              "file": rows["file"], "distance": distances[0][found]})
        table["same_image"] = [bool(query_hash) and _hash_of(row) == query_hash
                               for _, row in rows.iterrows()]
        if exclude_self:
            table = table[~table["same_image"]]
        table = table.head(k).reset_index(drop=True)
        table.insert(0, "rank", np.arange(1, len(table) + 1))
        return table


def _hash_of(row: pd.Series) -> str:
    """The stored content hash; a manifest written before hashes were (evaluate's, until it
    uses ``save``) has none, so the file is hashed now, or '' when it cannot be read."""
    if row["content_hash"]:
        return str(row["content_hash"])
    from retrieval import data

    try:
        return data.content_hash(row["file"])
    except OSError:
        return ""


# --------------------------------------------------------------------------- building


def folder_manifest(folder: Path, files: list[Path]) -> pd.DataFrame:
    """The manifest of image ``files`` found under ``folder``: path relative to it, label the
    first sub-folder when every file lies in one (a folder per class), else '', the absolute
    file and its content hash."""
    from retrieval import data

    relative = [f.relative_to(folder) for f in files]
    per_class = all(len(r.parts) > 1 for r in relative)
    return pd.DataFrame({
        "path": [r.as_posix() for r in relative],
        "label": [r.parts[0] if per_class else "" for r in relative],
        "file": [str(f.resolve()) for f in files],
        "content_hash": [data.content_hash(f) for f in files]})


def card(model: str | Path, dim: int, items: int, factory: str = search.EXACT,
         search_params: dict | None = None, image_size: int | None = None,
         threshold: float | None = None) -> dict:
    """The card of a gallery embedded by the checkpoint ``model``."""
    return {"model": Path(model).as_posix(), "model_sha256": outputs.file_digest(model),
            "dim": dim, "items": items, "distance": DISTANCE, "index": factory,
            "search_params": search_params or {}, "image_size": image_size,
            "threshold": threshold}


def build(vectors: np.ndarray, manifest: pd.DataFrame, model: str | Path,
          image_size: int | None, threshold: float | None, factory: str = search.EXACT,
          target_recall: float = 0.95, seed: int = 0) -> tuple[Gallery, float]:
    """A gallery of ``vectors`` (N, D), row i described by manifest row i, and the recall@10
    its search parameters reach (1.0 when exact).

    An approximate ``factory`` is tuned here: up to ``TUNING_QUERIES`` seeded gallery items are
    searched exactly and approximately, themselves left out of both, and the cheapest
    nprobe/efSearch whose recall@10 reaches ``target_recall`` goes into the card.
    """
    missing = [c for c in COLUMNS if c not in manifest.columns]
    if missing:
        raise ValueError(f"the manifest has no column {missing[0]!r}: it needs {COLUMNS}")
    if len(manifest) != len(vectors):
        raise ValueError(f"{len(vectors)} vectors but {len(manifest)} manifest rows")
    try:
        index = search.build_index(vectors, factory, seed=seed)
    except ValueError as error:
        raise UserError(str(error)) from None
    params, recall = {}, 1.0
    if factory != search.EXACT and len(vectors) > 1:
        rows = np.sort(np.random.default_rng(seed).permutation(len(vectors))[:TUNING_QUERIES])
        sample = np.ascontiguousarray(vectors[rows], dtype=np.float32)
        _, truth = search.knn(sample, vectors, min(TUNING_K, len(vectors) - 1) + 1)
        params, recall = search.tune_search_params(index, sample, truth, target_recall,
                                                   own=rows)
    gallery = Gallery(index, manifest[list(COLUMNS)].reset_index(drop=True),
                      card(model, index.d, index.ntotal, factory, params, image_size,
                           threshold))
    return gallery, recall


# --------------------------------------------------------------------------- files


def files(path: str | Path) -> tuple[Path, Path, Path]:
    """(NAME.faiss, NAME.csv, NAME.json) of an index path."""
    path = Path(path)
    return path, path.with_suffix(".csv"), path.with_suffix(".json")


def check_index_path(path: str | Path, flag: str = "--out") -> None:
    """An index path names the .faiss file; its .csv and .json go beside it."""
    path = Path(path)
    if path.suffix != ".faiss":
        raise UserError(f"{flag} {path} must end in .faiss (the manifest and the card are "
                        f"written beside it as {path.stem}.csv and {path.stem}.json)")
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder: give a NAME.faiss file path")


def save(gallery: Gallery, path: str | Path) -> None:
    """Write the three files; all three are renamed into place only once all are written."""
    check_index_path(path)
    index_file, manifest_file, card_file = files(path)
    _check_consistent(gallery, index_file)
    with ExitStack() as stack:
        # Exiting the stack renames card, manifest, then index: none if any write failed.
        temp_index, temp_manifest, temp_card = (
            stack.enter_context(outputs.atomic_path(f)) for f in files(path))
        search.save_index(gallery.index, temp_index)
        outputs.write_csv(temp_manifest, gallery.manifest[list(COLUMNS)])
        outputs.write_json(temp_card, gallery.card)


def _check_consistent(gallery: Gallery, index_file: Path) -> None:
    if len(gallery.manifest) != gallery.index.ntotal:
        raise UserError(f"{index_file.with_suffix('.csv')} lists {len(gallery.manifest)} "
                        f"images but {index_file} holds {gallery.index.ntotal}: rebuild the "
                        "index (`retrieval index`, or `dvc repro evaluate` for the test gallery)")
    for key, actual in (("dim", gallery.index.d), ("items", gallery.index.ntotal)):
        if gallery.card.get(key, actual) != actual:
            raise UserError(f"{index_file.with_suffix('.json')} says {key} "
                            f"{gallery.card[key]} but {index_file} has {actual}: the files "
                            "come from different builds; rebuild the index")


def load(path: str | Path, rebuild: str = "`retrieval index FOLDER --out INDEX`",
         base: Path | None = None) -> Gallery:
    """The gallery saved at ``path`` (the .faiss file). ``rebuild`` is what the messages tell
    the user to run when a file is missing or does not belong to the others; relative ``file``
    entries (evaluate's, relative to the project) are made absolute against ``base``."""
    index_file, manifest_file, card_file = files(path)
    if index_file.is_dir():
        raise UserError(f"index {index_file} is a folder: give the .faiss file")
    if not index_file.is_file():
        raise UserError(f"no gallery index at {index_file}: build it with {rebuild}")
    try:
        index = search.load_index(index_file)
    except ValueError as error:
        raise UserError(str(error)) from None
    if not manifest_file.is_file():
        raise UserError(f"{manifest_file} (the manifest of {index_file}) does not exist: "
                        f"rebuild the index with {rebuild}")
    manifest = outputs.read_table(manifest_file, ("path", "label"), keep_default_na=False,
                                  dtype={"label": str, "content_hash": str})
    manifest = manifest.reindex(columns=[*COLUMNS, *[c for c in manifest.columns
                                                     if c not in COLUMNS]], fill_value="")
    if base is not None:
        manifest["file"] = [str(base / f) if f and not Path(f).is_absolute() else f
                            for f in manifest["file"].astype(str)]
    # A card is optional for a gallery written before cards held the search settings.
    gallery = Gallery(index, manifest, outputs.read_json(card_file) if card_file.is_file()
                      else {})
    _check_consistent(gallery, index_file)
    if gallery.card.get("search_params"):
        try:
            search.set_search_params(index, gallery.card["search_params"])
        except ValueError as error:
            raise UserError(f"{card_file}: {error}; rebuild the index with {rebuild}") from None
    return gallery

