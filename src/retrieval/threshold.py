"""The decision threshold of a checkpoint: two images are "the same class" when the Euclidean
distance between their embeddings is at most it. One rule says which threshold that is.

Training stores a threshold in every checkpoint, chosen on the val pairs it scores each epoch
(``train.val_pairs``, a few hundred). evaluate chooses it again on its own, larger set of val
pairs (``evaluate.val_pairs``), reports the test accuracy at that one, and saves it beside the
checkpoint (``beside``: ``models/<stage>/threshold.json``) with the checkpoint's SHA-256.

``resolve`` is the rule that `retrieval compare`, `retrieval index`, the search page
(`retrieval serve`) and the export follow, and ``of_evaluate`` the part of it the report uses:
evaluate's threshold when the file beside the checkpoint records these very bytes (the
checkpoint evaluate scored); otherwise (another checkpoint, one retrained since, or evaluate has
not run) the checkpoint's own, and ``source`` says so and why. No torch here: the report reads
it too.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retrieval import compared, outputs, paths
from retrieval.outputs import UserError

EVALUATE = "evaluate"  # Threshold.origin: chosen by evaluate for this checkpoint
CHECKPOINT = "checkpoint"  # stored in the checkpoint at training time
NONE = "none"  # neither: no same/different decision
KEYS = ("threshold", "model", "checkpoint", "checkpoint_sha256", "val_pairs", "criterion")


@dataclass(frozen=True)
class Threshold:
    """A decision threshold and where it comes from."""

    value: float | None
    origin: str  # EVALUATE | CHECKPOINT | NONE
    source: str  # one line for people: which threshold, chosen on what, read from where

    def same(self, distance: float) -> bool | None:
        """The decision for one distance (None: no threshold to decide with)."""
        return None if self.value is None else bool(distance <= self.value)


def beside(checkpoint: str | Path) -> Path:
    """Where evaluate saves the threshold of ``checkpoint``: in the same folder."""
    return Path(checkpoint).with_name(paths.THRESHOLD_FILE)


def saved_models(models: Sequence[compared.ComparedModel] = compared.COMPARED_MODELS
                 ) -> dict[str, str]:
    """Compared model -> training stage, for the models whose embedding is what their
    checkpoint's network computes (trained, not the backbone's pooled features): the ones
    `retrieval compare --model models/<stage>/best.pt` reproduces, so their threshold is saved
    beside that checkpoint. One such model per checkpoint."""
    chosen = {m.name: m.checkpoint for m in models if m.trained and m.view != "backbone"}
    stages = list(chosen.values())
    if len(set(stages)) != len(stages):
        raise ValueError(f"two compared models embed with one checkpoint's network: {chosen}")
    return chosen


def card(value: float, checkpoint: str | Path, model: str, val_pairs: int,
         criterion: str) -> dict[str, Any]:
    """What evaluate saves: the threshold of compared ``model``, chosen on ``val_pairs`` val
    pairs by ``criterion``, for the checkpoint file ``checkpoint`` (its SHA-256)."""
    return {"threshold": float(value), "model": model,
            "checkpoint": Path(checkpoint).as_posix(),
            "checkpoint_sha256": outputs.file_digest(checkpoint), "val_pairs": int(val_pairs),
            "criterion": criterion}


def save(saved: dict[str, Any], path: str | Path) -> None:
    """JSON at full precision (``outputs.write_json`` rounds to 6 decimals: a pair within 1e-6
    of the threshold would be decided differently from evaluate)."""
    with outputs.atomic_path(path) as temp:
        temp.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")


def read(path: str | Path) -> dict[str, Any]:
    """A saved threshold file (a damaged one: one-line DamagedOutputError)."""
    saved = outputs.read_json(path)
    with outputs.reading(path):
        missing = [key for key in KEYS if key not in saved]
        if missing:
            raise ValueError(f"no {missing[0]!r} key")
        float(saved["threshold"])
    return saved


def of_evaluate(checkpoint: str | Path) -> Threshold:
    """evaluate's threshold for the checkpoint file ``checkpoint`` (origin EVALUATE), or none
    (origin NONE, ``source`` says why). The file beside it counts only when it records the
    checkpoint's SHA-256: these very bytes were scored."""
    path = beside(checkpoint)
    if not Path(checkpoint).is_file():
        return Threshold(None, NONE, f"{Path(checkpoint).as_posix()} does not exist")
    if not path.is_file():
        return Threshold(None, NONE, f"{path.as_posix()} does not exist (`dvc repro evaluate` "
                                     "writes it)")
    saved = read(path)
    if saved["checkpoint_sha256"] != outputs.file_digest(checkpoint):
        return Threshold(None, NONE, f"{path.as_posix()} was chosen for another checkpoint "
                                     "(SHA-256 differs; `dvc repro evaluate` re-chooses it)")
    return Threshold(float(saved["threshold"]), EVALUATE,
                     f"evaluate's, chosen on {saved['val_pairs']} val pairs "
                     f"({saved['criterion']}) for this checkpoint, read from {path.as_posix()}")


def resolve(checkpoint_path: str | Path, checkpoint: dict[str, Any]) -> Threshold:
    """The threshold to decide with for the checkpoint file ``checkpoint_path`` (loaded as
    ``checkpoint``): evaluate's when saved for these bytes, else the checkpoint's own."""
    chosen = of_evaluate(checkpoint_path)
    if chosen.origin == EVALUATE:
        return chosen
    own = checkpoint.get("threshold")
    if own is None:
        return Threshold(None, NONE, f"{Path(checkpoint_path).as_posix()} stores none and "
                                     f"{chosen.source}")
    return Threshold(float(own), CHECKPOINT,
                     f"the checkpoint's own, chosen during training on its val pairs; not "
                     f"evaluate's, as {chosen.source}")


def required(threshold: Threshold, checkpoint_path: str | Path) -> float:
    """The value, or a one-line UserError when there is none to decide with."""
    if threshold.value is None:
        raise UserError(f"{checkpoint_path} has no decision threshold ({threshold.source}): use "
                        "a best.pt written at the end of a training stage")
    return threshold.value
