"""The training loop, readable top to bottom (nanoGPT-style): ``fit`` runs the epochs.

What an epoch is depends on the sampler the loss's ``losses.LOSSES`` entry names:
    pairs     a fresh balanced set of pairs (half same-class), resampled each epoch, optionally
              the hardest of a larger pool (train.hard_pairs)
    triplets  one triplet per anchor (or a seeded train.triplets_per_epoch of them); the
              negative is mined among the anchor's top-k nearest
              other-class neighbours under the current model (or random)
    batches   class-balanced batches (P classes x K images); the loss sees the whole batch
    views     an unlabelled shuffle of the train images, batch_size / 2 a step, each embedded
              twice in one forward batch so the augmentation gives it two different views
              (NT-Xent); it needs an ``ImageEncoder`` that augments, and validates on two
              views of every val image drawn from a fixed seed
A loss that needs a classifier sees the logits of a linear classifier on the head output,
every other loss the embeddings (L2-normalised unless model.normalize is false).

Where the inputs come from is the Encoder's business: ``FrozenEncoder`` trains the head on
backbone features computed once (train_frozen); ``ImageEncoder`` runs the whole network on
augmented crops from the decoded-image cache (train_unfrozen). Every epoch ends with validation
on fixed pairs, the LR scheduler, early stopping, the best weights kept by validation loss and an
atomic, resumable checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from retrieval import (
    headline,
    losses,
    metrics,
    models,
    outputs,
    paths,
    progress,
    rng,
    runtime,
    sampling,
    transforms,
)
from retrieval.cache import ImageCache
from retrieval.config import AugmentConfig, TrainConfig
from retrieval.embed import run_batched
from retrieval.models import EmbeddingNet
from retrieval.outputs import UserError, atomic_path


class NonFiniteLossError(UserError):
    """The loss became NaN/inf: training stops, the best checkpoint so far is kept."""


# --- encoders: indices into the split table -> embeddings -------------------------------------

class FrozenEncoder:
    """The head (and GeM's p) trains on backbone features computed once, in eval mode."""

    def __init__(self, model: EmbeddingNet, features: torch.Tensor, device: torch.device):
        self.model, self.features, self.device = model, features, device

    def project(self, indices: np.ndarray) -> torch.Tensor:  # (B, D), not normalised
        return self.model.from_frozen(self.features[indices].to(self.device), normalize=False)

    def eval_project(self, indices: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.project(indices).cpu().numpy()

    def set_train(self, training: bool) -> None:
        self.model.train(training)
        self.model.trunk.eval()  # frozen: BatchNorm statistics stay ImageNet's / initial

    def reseed(self, seed: int) -> None:
        """Nothing random: the features are fixed."""


class ImageEncoder:
    """The whole network on crops from the image cache; random augmentation when training."""

    def __init__(self, model: nn.Module, images: ImageCache, image_size: int,
                 augment: AugmentConfig, device: torch.device, precision: str,
                 frozen_trunk: bool = False):
        self.model, self.images, self.image_size = model, images, image_size
        self.frozen_trunk = frozen_trunk
        self.device, self.precision = device, precision
        self.augment_config = augment
        self.augment = (transforms.BatchAugment(image_size, augment, self.net.normalization)
                        if augment.enabled else None)
        self.crop = transforms.eval_crop(image_size)

    @property
    def net(self) -> EmbeddingNet:
        return getattr(self.model, "module", self.model)  # unwrap DistributedDataParallel

    def inputs(self, indices: np.ndarray) -> torch.Tensor:
        """Model inputs (B, 3, s, s): normalised float32, channels_last, on the device."""
        batch = self.images.batch(indices)  # (B, 3, S, S) uint8
        if self.augment is None:
            return runtime.model_input(self.crop(batch), self.device, self.net.normalization)
        return self.augment(batch.to(self.device, non_blocking=True))

    def project(self, indices: np.ndarray) -> torch.Tensor:
        x = self.inputs(indices)
        with runtime.autocast(self.device, self.precision):
            # Through the (possibly DDP-wrapped) module's forward, so DDP syncs gradients.
            return self.model(x, normalize=False)

    def eval_project(self, indices: np.ndarray) -> np.ndarray:
        net = self.net
        return run_batched(lambda x: net(x, normalize=False), self.images, indices,
                           self.image_size, self.device, self.precision, net.normalization)

    def eval_views(self, indices: np.ndarray, seed: int, batch_size: int) -> np.ndarray:
        """Embeddings (2, n, D), not normalised, of two random augmentations of each image, in
        inference mode: the views of each ``batch_size // 2`` images go through the network in
        one batch, as in training. The augmentation draws from its own generator seeded with
        ``seed`` (the training stream is left alone), so a fixed seed gives the same views at
        every call: validation's NT-Xent compares epochs on the same inputs."""
        if self.augment is None:
            raise ValueError("eval_views needs augmentation (two views of an unaugmented image "
                             "are the same): build the ImageEncoder with augment.enabled")
        augment = transforms.BatchAugment(self.image_size, self.augment_config,
                                          self.net.normalization)
        augment.reseed(seed)
        net, views = self.net, []
        with torch.inference_mode(), runtime.autocast(self.device, self.precision):
            for chunk in _chunks(indices, max(1, batch_size // 2)):
                batch = self.images.batch(np.concatenate([chunk, chunk]))
                z = net(augment(batch.to(self.device, non_blocking=True)), normalize=False)
                views.append(z.float().cpu().view(2, len(chunk), -1))  # [first; second] views
        return torch.cat(views, dim=1).numpy()

    def reseed(self, seed: int) -> None:
        """Restart the augmentation's random stream (``fit`` does, every epoch)."""
        if self.augment is not None:
            self.augment.reseed(seed)

    def set_train(self, training: bool) -> None:
        self.model.train(training)
        if self.frozen_trunk:
            self.net.trunk.eval()


# --- what one epoch iterates over --------------------------------------------------------------

@dataclass
class EpochWork:
    kind: losses.Sampler  # "pairs" | "triplets" | "batches" | "views"
    # per step, global indices: pairs (B, 3) [i, j, same], triplets (B, 3) [a, p, n], batches (B,),
    # views (B,) images, each embedded twice
    items: list[np.ndarray]
    mined_distances: np.ndarray = field(default_factory=lambda: np.zeros(0))


def _chunks(rows: np.ndarray, batch_size: int) -> list[np.ndarray]:
    return [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]


def epoch_work(cfg: TrainConfig, train_idx: np.ndarray, labels: np.ndarray, seed: int,
               epoch: int, embed_train: Callable[[], np.ndarray], batch_size: int) -> EpochWork:
    """This epoch's pairs/triplets/batches, as global indices; deterministic per (seed, epoch)."""
    train_labels = labels[train_idx]
    kind = losses.loss_spec(cfg.loss).sampler
    if kind == "pairs":
        if cfg.hard_pairs:
            rows = sampling.sample_hard_pairs(embed_train(), train_labels, cfg.pairs_per_epoch,
                                              seed, epoch)
        else:
            rows = sampling.sample_pairs(train_labels, cfg.pairs_per_epoch, seed, epoch)
        rows = np.column_stack([train_idx[rows[:, 0]], train_idx[rows[:, 1]], rows[:, 2]])
        return EpochWork(kind, _chunks(rows, max(1, batch_size // 2)))
    if kind == "triplets":
        mined = np.zeros(0)
        if cfg.negatives == "hard":
            embeddings = embed_train()
            negatives = sampling.mine_hard_negatives(embeddings, train_labels, cfg.mining_k,
                                                     seed, epoch)
            mined = np.linalg.norm(embeddings - embeddings[negatives], axis=1)
        else:
            negatives = sampling.random_negatives(train_labels, seed, epoch)
        rows = train_idx[sampling.sample_triplets(train_labels, negatives, seed, epoch)]
        if cfg.triplets_per_epoch:  # the triplets come shuffled: the first ones are a sample
            rows = rows[:cfg.triplets_per_epoch]
        return EpochWork(kind, _chunks(rows, max(1, batch_size // 3)), mined)
    if kind == "views":  # no labels read: other images of the same class are negatives
        steps = sampling.view_batches(len(train_idx), batch_size, seed, epoch)
        return EpochWork(kind, [train_idx[s] for s in steps])
    batches = sampling.class_balanced_batches(train_labels, batch_size, cfg.images_per_class,
                                              seed, epoch)
    return EpochWork(kind, [train_idx[b] for b in batches])


@dataclass
class StepStats:
    """Per-epoch training diagnostics accumulated over steps."""

    losses: list[float] = field(default_factory=list)
    active: list[float] = field(default_factory=list)
    positive_distances: list[np.ndarray] = field(default_factory=list)
    negative_distances: list[np.ndarray] = field(default_factory=list)

    def record_tuples(self, out: torch.Tensor, labels: torch.Tensor, tuples: torch.Tensor,
                      terms: torch.Tensor | None) -> None:
        """Distances from each tuple's first row to the others, split by same/other class, and
        the fraction of active (> 0) per-tuple loss terms."""
        anchor = out[tuples[:, 0]]
        for k in range(1, tuples.shape[1]):
            distance = (anchor - out[tuples[:, k]]).norm(dim=1).detach().cpu().numpy()
            same = (labels[tuples[:, 0]] == labels[tuples[:, k]]).cpu().numpy()
            self.positive_distances.append(distance[same])
            self.negative_distances.append(distance[~same])
        if terms is not None:
            self.active.append(float((terms > 0).float().mean()))

    def record_views(self, out: torch.Tensor, tuples: torch.Tensor) -> None:
        """Distances between the two views of each image (as positives) and from each image's
        first view to the next image's second view (a sample of negatives, one per image; a
        step has >= 2 images). No active fraction: every NT-Xent term is > 0."""
        first, second = out[tuples[:, 0]].detach(), out[tuples[:, 1]].detach()
        self.positive_distances.append((first - second).norm(dim=1).cpu().numpy())
        self.negative_distances.append((first - second.roll(1, dims=0)).norm(dim=1).cpu().numpy())

    def summary(self) -> dict[str, float]:
        pos = np.concatenate(self.positive_distances) if self.positive_distances else np.zeros(1)
        neg = np.concatenate(self.negative_distances) if self.negative_distances else np.zeros(1)
        return {"train_loss": float(np.mean(self.losses)),
                "active_fraction": float(np.mean(self.active)) if self.active else math.nan,
                "mean_positive_distance": float(pos.mean()),
                "mean_negative_distance": float(neg.mean())}


def step_inputs(kind: losses.Sampler,
                item: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """The images one step embeds, all in one batch (for BatchNorm), and the tuples of rows into
    them that the loss takes: pairs (B, 3) ``[i, j, same]`` embed ``[i..., j...]`` with tuples
    ``[k, B + k]``; triplets (B, 3) embed ``[a..., p..., n...]`` with ``[k, B + k, 2B + k]``;
    a batch (B,) embeds itself, no tuples; views (B,) embed ``[x..., x...]`` with tuples
    ``[k, B + k]``: both occurrences of an image sit in one batch, and the augmentation draws
    for every row of a batch independently, so they become two different views."""
    if kind == "batches":
        return item, None
    if kind == "views":
        b = len(item)
        return np.concatenate([item, item]), np.arange(b)[:, None] + b * np.arange(2)
    columns = item[:, :2] if kind == "pairs" else item  # the same flag is not an image
    b, width = columns.shape
    return columns.T.reshape(-1), np.arange(b)[:, None] + b * np.arange(width)


def loss_inputs(spec: losses.LossSpec, net: EmbeddingNet, z: torch.Tensor) -> torch.Tensor:
    """What the loss sees of the head output z (M, D): class logits (M, C) or the embedding
    (unit vectors unless model.normalize is false)."""
    return net.classifier(z) if spec.needs_classifier else net.embedding(z)


def train_step_loss(spec: losses.LossSpec, loss_fn: nn.Module, net: EmbeddingNet,
                    project: Callable, item: np.ndarray, labels: np.ndarray,
                    stats: StepStats) -> torch.Tensor:
    """Forward one step's inputs and return the loss (per-tuple diagnostics go to ``stats``)."""
    indices, tuples = step_inputs(spec.sampler, item)
    z = project(indices)  # (M, D), not normalised
    out = loss_inputs(spec, net, z)
    if spec.sampler == "views":  # label-free: the rows' pairing is all in the tuples
        rows = torch.as_tensor(tuples, device=z.device)
        stats.record_views(out, rows)
        return loss_fn(out, None, rows)
    y = torch.as_tensor(labels[indices], device=z.device)
    if tuples is None:
        return loss_fn(out, y)
    rows = torch.as_tensor(tuples, device=z.device)
    terms = loss_fn.terms(out, y, rows) if isinstance(loss_fn, losses.TupleLoss) else None
    stats.record_tuples(out, y, rows, terms)
    return terms.mean() if terms is not None else loss_fn(out, y, rows)


# --- validation ------------------------------------------------------------------------------

@dataclass
class EvalPairs:
    """Fixed pairs for validation (and for train-split metrics), as global indices."""

    val: np.ndarray  # (P, 3)
    train: np.ndarray  # (P, 3)

    @classmethod
    def build(cls, train_idx: np.ndarray, val_idx: np.ndarray, labels: np.ndarray, n: int,
              seed: int) -> EvalPairs:
        def pairs(idx: np.ndarray, epoch: int) -> np.ndarray:
            rows = sampling.sample_pairs(labels[idx], n, seed, epoch)
            return np.column_stack([idx[rows[:, 0]], idx[rows[:, 1]], rows[:, 2]])

        return cls(pairs(val_idx, rng.VAL_EPOCH), pairs(train_idx, rng.TRAIN_EVAL_EPOCH))


def embedding_space(net: EmbeddingNet, z: np.ndarray) -> np.ndarray:
    """Head outputs (N, D) as the embeddings retrieval compares: unit rows unless
    model.normalize is false (numpy twin of ``EmbeddingNet.embedding``)."""
    return metrics.l2_normalize(z) if net.config.normalize else np.asarray(z, dtype=np.float32)


def pair_distances(z: dict[int, np.ndarray], pairs: np.ndarray) -> np.ndarray:
    """Euclidean distance of each pair ``[i, j, same]`` of embeddings ``z[i]``, ``z[j]``."""
    a = np.stack([z[i] for i in pairs[:, 0]])
    b = np.stack([z[j] for j in pairs[:, 1]])
    return metrics.pair_distances(a, b)


def validation_loss(spec: losses.LossSpec, loss_fn: nn.Module, net: EmbeddingNet,
                    z_val: np.ndarray, val_idx: np.ndarray, labels: np.ndarray, seed: int,
                    val_pairs: np.ndarray, position: dict[int, int]) -> float:
    """The training loss on fixed validation inputs built the way training builds them."""
    val_labels = labels[val_idx]
    if spec.sampler == "pairs":  # the fixed validation pairs, as positions in z_val
        rows = np.column_stack([[position[i] for i in val_pairs[:, 0]],
                                [position[j] for j in val_pairs[:, 1]], val_pairs[:, 2]])
        indices, tuples = step_inputs("pairs", rows)
    elif spec.sampler == "triplets":  # fixed random triplets of the val split
        negatives = sampling.random_negatives(val_labels, seed, rng.VAL_EPOCH)
        indices = np.arange(len(val_idx))
        tuples = sampling.sample_triplets(val_labels, negatives, seed, rng.VAL_EPOCH)
    else:  # the whole val split as one batch
        indices, tuples = np.arange(len(val_idx)), None
    z = torch.from_numpy(z_val)[indices]
    with torch.no_grad():
        if spec.needs_classifier:
            if net.classifier is None:
                return math.nan
            # On the classifier's device, without moving it (training continues there).
            device = next(net.classifier.parameters()).device
            out = net.classifier(z.to(device)).cpu()
        else:
            out = net.embedding(z)
        y = torch.as_tensor(val_labels[indices])
        return float(loss_fn(out, y, None if tuples is None else torch.from_numpy(tuples)))


def views_validation_loss(loss_fn: nn.Module, views: np.ndarray, batch_size: int,
                          seed: int) -> float:
    """NT-Xent on two fixed augmented views (2, n, D) of the n val images, in steps of the
    training's size (the loss depends on how many negatives a step has): a fixed shuffle
    (``rng.VAL_EPOCH``) cut like a training epoch, the steps' losses weighted by their images.
    No labels, like the training loss."""
    total, images = 0.0, 0
    with torch.no_grad():
        for step in sampling.view_batches(views.shape[1], batch_size, seed, rng.VAL_EPOCH):
            _, tuples = step_inputs("views", step)
            z = torch.from_numpy(np.concatenate([views[0][step], views[1][step]]))
            total += len(step) * float(loss_fn(z, None,  # NT-Xent compares by cosine
                                               torch.from_numpy(tuples)))
            images += len(step)
    return total / images if images else math.nan


def pair_metrics(distances: np.ndarray, same: np.ndarray, threshold: float) -> dict[str, float]:
    scores = metrics.verification_scores(same, (distances <= threshold).astype(int))
    return {k: scores[k] for k in ("accuracy", "precision", "recall", "f1")}


# --- checkpoints -----------------------------------------------------------------------------

def fingerprint(*parts: object) -> str:
    """Identifies a training configuration (params + data) for resuming."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def source_digest(*modules: object) -> str:
    """SHA-256 of the modules' source files: a cache keyed on it is not reused across a code
    change that could alter what it holds."""
    return hashlib.sha256(b"".join(Path(module.__file__).read_bytes()
                                   for module in modules)).hexdigest()


def resume_fingerprint(*parts: object) -> str:
    """``fingerprint`` of a training run for its resume state, with the source of the code that
    shapes an epoch (this module, the losses, samplers, model, augmentation): a state saved by
    other code (say, another epoch-0 row) is ignored, never resumed."""
    import sys

    return fingerprint(*parts, source_digest(sys.modules[__name__], losses, sampling, models,
                                             transforms, rng, runtime))


def save_resume_state(path: Path, state: dict) -> None:
    with atomic_path(path) as temp, open(temp, "wb") as stream:  # see models.save_checkpoint
        torch.save(state, stream)


def load_resume_state(path: Path, expected_fingerprint: str) -> dict | None:
    if not path.is_file():
        return None
    try:  # weights_only: a resume file holding pickled code is refused, never run
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        progress.note(f"ignoring the resume checkpoint {path}, which cannot be read safely "
                      f"({type(error).__name__}): training starts from epoch 1")
        return None
    if not isinstance(state, dict) or state.get("fingerprint") != expected_fingerprint:
        return None
    return state


# --- the loop --------------------------------------------------------------------------------

@dataclass(frozen=True)
class ResumeSpec:
    """Where ``fit`` keeps its end-of-epoch resume state, and what identifies the run: a state
    file with another fingerprint (other params or data) is ignored, never resumed."""

    path: Path
    fingerprint: str


@dataclass
class Best:
    """The best epoch so far by validation loss; epoch 0 is the model before this stage."""

    loss: float = math.inf
    epoch: int = 0
    threshold: float = 1.0  # chosen on validation at that epoch
    state: dict[str, torch.Tensor] | None = None  # a snapshot (may leave out a frozen trunk)
    row: dict = field(default_factory=dict)  # its history row; {} for epoch 0

    def to_state(self) -> dict:
        """Plain types for the resume file (loaded with weights_only=True: no dataclasses)."""
        return {"loss": self.loss, "epoch": self.epoch, "threshold": self.threshold,
                "state": self.state, "row": self.row}

    @classmethod
    def from_state(cls, state: dict) -> Best:
        return cls(**state)


@dataclass
class FitResult:
    history: pd.DataFrame
    best_epoch: int
    best_val_loss: float
    best_state: dict
    threshold: float
    stopped: str  # "epochs" | "early_stopping"
    train_seconds: float
    images_seen: int
    resumed_from_epoch: int = 0


def fit(net: EmbeddingNet, encoder: FrozenEncoder | ImageEncoder,
        optimizer: torch.optim.Optimizer, data: TrainingData, cfg: TrainConfig, *,
        epochs: int, seed: int, resume: ResumeSpec | None = None,
        on_epoch: Callable[[int, dict], None] | None = None,
        save_best: Callable[[dict, int, dict], None] | None = None) -> FitResult:
    """Train ``net`` through ``encoder`` on ``data``'s train split for up to ``epochs``, keeping
    the weights with the lowest validation loss (for NT-Xent, the label-free
    ``views_validation_loss``). ``resume``: continue from (and write) the
    state of the last finished epoch; ``None`` keeps none. ``on_epoch(epoch, row)`` sees each
    history row; ``save_best(state, epoch, row)`` gets the best weights if training stops on a
    non-finite value."""
    train_idx, val_idx, labels = data.train_idx, data.val_idx, data.labels
    spec = losses.loss_spec(cfg.loss)
    if spec.sampler == "views" and not (isinstance(encoder, ImageEncoder)
                                        and encoder.augment is not None):
        # The stages refuse these params first (losses.check_params); this guards other callers.
        raise UserError(f"train.loss '{cfg.loss}' needs two different augmentations of each "
                        "image, but this encoder does not augment: train through an "
                        "ImageEncoder with augmentation enabled")
    loss_fn = spec.build(cfg)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=cfg.lr_factor, patience=cfg.lr_patience)
    eval_pairs = EvalPairs.build(train_idx, val_idx, labels, cfg.val_pairs, seed)
    val_position = {int(i): p for p, i in enumerate(val_idx)}
    train_eval_images = np.unique(eval_pairs.train[:, :2])
    batch_size = cfg.batch_size

    history: list[dict] = []
    best = Best()
    snapshot = _snapshot_function(net)
    bad_epochs, start_epoch, images_seen, seconds = 0, 1, 0, 0.0
    resumed = load_resume_state(resume.path, resume.fingerprint) if resume else None
    if resumed is not None:
        _load_snapshot(net, resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        history, best = resumed["history"], Best.from_state(resumed["best"])
        bad_epochs, images_seen = resumed["bad_epochs"], resumed["images_seen"]
        seconds, start_epoch = resumed["seconds"], resumed["epoch"] + 1
        progress.note(f"resuming from the checkpoint of epoch {resumed['epoch']} "
                      f"({resume.path})")

    def stop(message: str) -> NonFiniteLossError:
        """A non-finite value ends training: the best weights so far go to disk first."""
        if save_best is not None and best.state is not None and runtime.is_main_process():
            save_best(_full_state(net, best), best.epoch, best.row)
        return NonFiniteLossError(message)

    def validate() -> dict[str, float]:
        encoder.set_train(False)
        z_val = encoder.eval_project(val_idx)
        if not np.isfinite(z_val).all():
            raise stop(
                "non-finite (NaN/inf) embeddings: lower lr or check the input data; the "
                f"best checkpoint so far (epoch {best.epoch}) is kept")
        if spec.sampler == "views":  # two augmented views, drawn from the same seed each epoch
            views = encoder.eval_views(val_idx, rng.torch_epoch_seed(
                seed, rng.VAL_EPOCH, rng.TorchStream.AUGMENT), batch_size)
            val_loss = views_validation_loss(loss_fn, views, batch_size, seed)
        else:
            val_loss = validation_loss(spec, loss_fn, net, z_val, val_idx, labels, seed,
                                       eval_pairs.val, val_position)
        val_d = pair_distances(dict(zip(val_idx.tolist(), embedding_space(net, z_val),
                                        strict=True)), eval_pairs.val)
        threshold = metrics.choose_threshold(val_d, eval_pairs.val[:, 2],
                                             cfg.threshold_criterion)
        z_train = dict(zip(train_eval_images.tolist(),
                           embedding_space(net, encoder.eval_project(train_eval_images)),
                           strict=True))
        train_d = pair_distances(z_train, eval_pairs.train)
        return {"val_loss": val_loss, "threshold": threshold,
                "mean_val_pairwise_distance": _mean_pairwise_distance(z_val),
                **{f"train_{k}": v for k, v in
                   pair_metrics(train_d, eval_pairs.train[:, 2], threshold).items()},
                **{f"val_{k}": v for k, v in
                   pair_metrics(val_d, eval_pairs.val[:, 2], threshold).items()}}

    def start_epoch_work(epoch: int) -> EpochWork:
        """Seed the epoch's dropout and augmentation, then draw its steps (the miners see the
        embeddings of the model as it stands); this rank's share of them under DDP."""
        # Seeded per epoch, so a resumed run continues exactly like an uninterrupted one.
        torch.manual_seed(rng.torch_epoch_seed(seed, epoch, rng.TorchStream.DROPOUT))
        encoder.reseed(rng.torch_epoch_seed(seed, epoch, rng.TorchStream.AUGMENT))
        encoder.set_train(False)
        work = epoch_work(cfg, train_idx, labels, seed, epoch,
                          lambda: embedding_space(net, encoder.eval_project(train_idx)),
                          batch_size)
        # DDP: every rank takes every world_size-th step; equal counts or the all-reduce hangs.
        world = runtime.world_size()
        work.items = work.items[:len(work.items) // world * world][runtime.rank()::world]
        return work

    first_work: EpochWork | None = None
    if not history:  # epoch 0: the model before this stage trains; also the first "best"
        row = {"epoch": 0, **validate(), "lr": optimizer.param_groups[0]["lr"]}
        best = Best(row["val_loss"], 0, row["threshold"], snapshot())
        # Its training loss: epoch 1's steps through the starting weights, in training mode
        # and without a single update, so the train curve has a value at epoch 0 measured as
        # at every later epoch (a step mean) and starts where training starts. Training mode
        # moves BatchNorm's running statistics: the start weights go back afterwards, and
        # epoch 1 reuses these steps (its miners would see the same embeddings).
        first_work = start_epoch_work(1)
        encoder.set_train(True)
        stats = StepStats()
        with torch.no_grad():
            for item in first_work.items:
                stats.losses.append(
                    train_step_loss(spec, loss_fn, net, encoder.project, item, labels,
                                    stats).item())
        _load_snapshot(net, best.state)
        row = {"epoch": 0, **stats.summary(), **row,
               **_collapse_diagnostics(row["mean_val_pairwise_distance"], stats, spec, cfg)}
        if not math.isfinite(row["train_loss"]):
            raise stop(f"non-finite training loss ({row['train_loss']}) before the first "
                       "step: check the data and the model's initialisation")
        history.append(row)
        progress.note(epoch_line(row, epochs))

    stopped = "epochs"
    # On a terminal a bar; in a log the epoch lines below say it all (summary=False).
    for epoch in progress.Progress(range(start_epoch, epochs + 1), desc="epochs", unit="epoch",
                                   initial=start_epoch - 1, total=epochs, summary=False):
        if bad_epochs >= cfg.early_stopping_patience:
            stopped = "early_stopping"
            break
        started = time.perf_counter()
        if epoch == 1 and first_work is not None:  # drawn at epoch 0 with the same seeds
            work, first_work = first_work, None
            torch.manual_seed(rng.torch_epoch_seed(seed, epoch, rng.TorchStream.DROPOUT))
            encoder.reseed(rng.torch_epoch_seed(seed, epoch, rng.TorchStream.AUGMENT))
        else:
            work = start_epoch_work(epoch)
        items = work.items
        encoder.set_train(True)
        stats = StepStats()
        for item in progress.Progress(items, desc=f"epoch {epoch}", unit="step", leave=False,
                                      summary=False):
            loss = train_step_loss(spec, loss_fn, net, encoder.project, item, labels, stats)
            if not torch.isfinite(loss):
                raise stop(
                    f"non-finite training loss ({loss.item()}) at epoch {epoch}: lower lr "
                    f"(now {optimizer.param_groups[0]['lr']:g}) or check the data; the best "
                    f"checkpoint so far (epoch {best.epoch}) is kept")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            stats.losses.append(loss.item())
            images_seen += item.size
        train_seconds = time.perf_counter() - started

        # Validation: every rank computes the same numbers, so decisions stay in sync.
        lr_now = optimizer.param_groups[0]["lr"]
        row = {"epoch": epoch, **stats.summary(), **validate(), "lr": lr_now,
               "epoch_seconds": time.perf_counter() - started}
        row.update(_collapse_diagnostics(row["mean_val_pairwise_distance"], stats, spec, cfg))
        val_loss, threshold = row["val_loss"], row["threshold"]
        if len(work.mined_distances):
            for q in (10, 50, 90):
                row[f"mined_negative_distance_p{q}"] = float(
                    np.percentile(work.mined_distances, q))
        if not math.isfinite(val_loss):
            raise stop(f"non-finite validation loss at epoch {epoch}: lower lr; "
                       f"the best checkpoint (epoch {best.epoch}) is kept")
        history.append(row)
        seconds += train_seconds

        if val_loss < best.loss - 1e-6:
            best = Best(val_loss, epoch, threshold, snapshot(), row)
            bad_epochs = 0
        elif best.epoch > 0:
            # Patience starts once training has beaten the model it started from: fine-tuning
            # a trunk first gets worse (Caltech-101 from scratch: val accuracy 0.77 -> 0.68 ->
            # back above 0.77 by epoch 7), and stopping in that dip returns the start model.
            bad_epochs += 1
        scheduler.step(val_loss)
        next_lr = optimizer.param_groups[0]["lr"]  # the scheduler's change, not a callback's
        if on_epoch is not None and runtime.is_main_process():
            on_epoch(epoch, row)
        progress.note(epoch_line(row, epochs, best=best.epoch == epoch, next_lr=next_lr))
        if row["collapse_alarm"]:
            progress.note(f"warning: epoch {epoch}: embeddings look collapsed (mean val "
                          f"distance {row['mean_val_pairwise_distance']:.3g}); consider a "
                          "lower lr")
        if resume is not None and runtime.is_main_process():
            save_resume_state(resume.path, {
                "fingerprint": resume.fingerprint, "epoch": epoch,
                "model": snapshot(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "history": history, "best": best.to_state(), "bad_epochs": bad_epochs,
                "images_seen": images_seen, "seconds": seconds})
        runtime.barrier()

    if resume is not None and runtime.is_main_process():
        resume.path.unlink(missing_ok=True)  # finished: a re-run trains afresh
    progress.note(stop_line(stopped, history, best.epoch, epochs, bad_epochs,
                            cfg.early_stopping_patience))
    return FitResult(pd.DataFrame(history), best.epoch, best.loss, _full_state(net, best),
                     best.threshold, stopped, seconds, images_seen,
                     resumed["epoch"] if resumed else 0)


def epoch_line(row: dict, epochs: int, *, best: bool = False,
               next_lr: float | None = None) -> str:
    """One log line per epoch: 'epoch 3/20: train loss 0.41, val loss 0.39, val accuracy 0.81,
    lr 0.001, 2.3 s'. Epoch 0 is the model before training (no step taken)."""
    if row["epoch"] == 0:
        return (f"epoch 0/{epochs} (before training): train loss {row['train_loss']:.4f}, "
                f"val loss {row['val_loss']:.4f}, val accuracy {row['val_accuracy']:.3f}")
    line = (f"epoch {row['epoch']}/{epochs}: train loss {row['train_loss']:.4f}, "
            f"val loss {row['val_loss']:.4f}, val accuracy {row['val_accuracy']:.3f}, "
            f"lr {row['lr']:.3g}, {row['epoch_seconds']:.1f} s")
    if best:
        line += "  (best so far)"
    if next_lr is not None and next_lr != row["lr"]:
        line += f"  (val loss stalled: lr -> {next_lr:.3g})"
    return line


def stop_line(stopped: str, history: list[dict], best_epoch: int, epochs: int,
              bad_epochs: int, patience: int) -> str:
    """Why training ended and which epoch's weights were kept (lowest validation loss)."""
    last = history[-1]["epoch"]
    if stopped == "early_stopping":
        why = (f"stopped early after epoch {last}/{epochs}: val loss has not improved for "
               f"{bad_epochs} epochs (early_stopping_patience {patience})")
    else:
        why = f"ran all {epochs} epochs"
    kept = next(row for row in history if row["epoch"] == best_epoch)
    which = (f"kept epoch {best_epoch} (lowest val loss {kept['val_loss']:.4f}, "
             f"val accuracy {kept['val_accuracy']:.3f})")
    if best_epoch == 0:
        which += ": the model before training, as no epoch improved on it"
    return f"training {why}; {which}"


def _snapshot_function(net: nn.Module) -> Callable[[], dict[str, torch.Tensor]]:
    """A copy of what training can change: everything but a frozen trunk (train_frozen's trunk
    is ~97% of a ResNet-18's weights and never changes: copying it every epoch is waste)."""
    trunk = getattr(net, "trunk", None)
    frozen = trunk is not None and not any(p.requires_grad for p in trunk.parameters())
    return lambda: {k: v.detach().cpu().clone() for k, v in net.state_dict().items()
                    if not (frozen and k.startswith("trunk."))}


def _load_snapshot(net: nn.Module, state: dict[str, torch.Tensor]) -> None:
    missing, unexpected = net.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("trunk.") for k in missing):
        raise RuntimeError(f"resume state does not fit the model: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")


def _full_state(net: nn.Module, best: Best) -> dict[str, torch.Tensor]:
    """The best weights as a whole state_dict (a snapshot may leave out the frozen trunk)."""
    return {**{k: v.detach().cpu() for k, v in net.state_dict().items()}, **best.state}


def _mean_pairwise_distance(z: np.ndarray) -> float:
    """Root mean squared pairwise distance of the normalised embeddings, without N x N."""
    centred = metrics.l2_normalize(z) - metrics.l2_normalize(z).mean(axis=0)
    # Mean pairwise squared distance = 2 * mean squared distance to the centroid.
    return float(np.sqrt(2 * (centred**2).sum(axis=1).mean()))


def _collapse_diagnostics(mean_pairwise: float, stats: StepStats, spec: losses.LossSpec,
                          cfg: TrainConfig) -> dict[str, float]:
    """Collapse alarm: all embeddings at one point, or the loss pinned at its collapsed value."""
    collapsed_loss = spec.collapsed_value(cfg) if spec.collapsed_value else math.nan
    stuck = math.isfinite(collapsed_loss) and abs(np.mean(stats.losses) - collapsed_loss) < 1e-4
    return {"collapse_alarm": float(mean_pairwise < 0.05 or stuck)}


def build_optimizer(net: EmbeddingNet, name: str, lr: float, weight_decay: float,
                    momentum: float, backbone_lr_mult: float = 1.0) -> torch.optim.Optimizer:
    """Head (and pooling, classifier) at lr; trainable backbone parameters at lr * mult."""
    backbone = [p for p in net.trunk.parameters() if p.requires_grad]
    trunk_ids = {id(p) for p in net.trunk.parameters()}
    rest = [p for p in net.parameters() if p.requires_grad and id(p) not in trunk_ids]
    groups = [{"params": rest, "lr": lr}]
    if backbone:
        groups.append({"params": backbone, "lr": lr * backbone_lr_mult})
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay)


# --- setting up a training stage ---------------------------------------------------------------

@dataclass
class TrainingData:
    labels: np.ndarray  # (N,) int class ids for every row of the split table
    classes: list[str]
    train_idx: np.ndarray
    val_idx: np.ndarray

    @classmethod
    def from_table(cls, table: pd.DataFrame) -> TrainingData:
        classes = sorted(table["label"].unique())
        labels = table["label"].map({c: i for i, c in enumerate(classes)}).to_numpy(np.int64)
        split = table["split"].to_numpy()
        return cls(labels, classes, np.flatnonzero(split == "train"),
                   np.flatnonzero(split == "val"))


def classifier_classes(cfg: TrainConfig, data: TrainingData) -> int:
    """``EmbeddingNet``'s ``num_classes`` for this loss: the class count, or 0 (no classifier)."""
    return len(data.classes) if losses.loss_spec(cfg.loss).needs_classifier else 0


def feature_cache_key(net: EmbeddingNet, images: ImageCache, indices: np.ndarray,
                      image_size: int, precision: str) -> str:
    """Everything the frozen features depend on: the images and which of them, the size and
    numerics, the trunk's actual weights (ImageNet, a file or a seeded random init), the code
    that turns pixels into features, and the library versions that run it. An edit to any of
    these is a new key, never a stale hit."""
    import torchvision

    from retrieval import embed

    weights = hashlib.sha256()
    for name, tensor in net.trunk.state_dict().items():
        weights.update(name.encode())
        weights.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    code = source_digest(models, transforms, runtime, embed)
    versions = {"torch": torch.__version__, "torchvision": torchvision.__version__,
                "timm": _version("timm")}
    return fingerprint(images.key, hashlib.sha256(np.asarray(indices).tobytes()).hexdigest(),
                       image_size, precision, net.config.backbone, net.config.pooling,
                       weights.hexdigest(), code, versions)


def _version(package: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def frozen_features(net: EmbeddingNet, images: ImageCache, indices: np.ndarray,
                    image_size: int, device: torch.device, precision: str) -> np.ndarray:
    """What a frozen trunk gives for these images (pooled vectors, or maps for GeM)."""
    net.eval()
    return run_batched(net.frozen_features, images, indices, image_size, device, precision,
                       net.normalization, desc="backbone features (once)")


def best_checkpoint_writer(checkpoint: Path, stage: str, net: EmbeddingNet, data: TrainingData,
                           image_size: int) -> Callable[[dict, int, dict], None]:
    """``fit``'s ``save_best``: when training stops on a non-finite value, the best weights so
    far go to ``checkpoint``, so the failed run still leaves a usable model."""
    return lambda state, epoch, row: _write_best(checkpoint, stage, net, state, data,
                                                 image_size, epoch=epoch, metrics=row)


def _write_best(checkpoint: Path, stage: str, net: EmbeddingNet, state: dict,
                data: TrainingData, image_size: int, **meta) -> None:
    net.load_state_dict(state)
    models.save_checkpoint(checkpoint, net, {
        **meta, "stage": stage, "classes": data.classes, "image_size": image_size})


def finish_stage(stage: str, checkpoint: Path, net: EmbeddingNet, result: FitResult,
                 data: TrainingData, image_size: int, title: str, run,
                 extra_metrics: dict | None = None) -> dict:
    """After ``fit``: the best weights and the threshold chosen on val into ``checkpoint``, the
    history CSV and curves under the stage's plots, the details, headline and timing JSON, and all
    of it to the stage's MLflow ``run`` (the headline to its parent too). Returns the details."""
    _write_best(checkpoint, stage, net, result.best_state, data, image_size,
                epoch=result.best_epoch, threshold=result.threshold)
    plots = paths.plots(stage)
    write_history(result.history, plots / "history.csv", plots / "curves.png", title)
    summary = {**summary_metrics(result), **(extra_metrics or {})}
    headline.write(stage, summary)
    outputs.write_json(paths.timing(stage), timing_metrics(result))
    run.log_metrics(summary)
    run.log_headline(headline.flat(stage, summary))
    run.log_metrics(timing_metrics(result))
    run.log_artifact(plots)
    return summary


def write_history(history: pd.DataFrame, csv_path: Path, figure_path: Path, title: str) -> None:
    from retrieval.plots import training as training_plots

    outputs.write_csv(csv_path, history)
    outputs.save_figure(training_plots.training_curves(history, title), figure_path)


def summary_metrics(result: FitResult) -> dict[str, float]:
    """The stage's metrics JSON: best epoch, its validation numbers, time and throughput."""
    history = result.history.set_index("epoch")
    best = history.loc[result.best_epoch]
    before = history.loc[history.index.min()]
    return {"best_epoch": result.best_epoch, "best_val_loss": result.best_val_loss,
            "epochs_run": int(history.index.max()), "stopped": result.stopped,
            "val_accuracy": best["val_accuracy"], "val_f1": best["val_f1"],
            "val_precision": best["val_precision"], "val_recall": best["val_recall"],
            "val_accuracy_before": before["val_accuracy"], "val_f1_before": before["val_f1"],
            "threshold": result.threshold, "lr_reductions": int(
                (history["lr"].diff().fillna(0) < 0).sum())}


def timing_metrics(result: FitResult) -> dict[str, float]:
    """Wall-clock numbers, kept apart from the metrics so those stay identical across runs."""
    epochs = result.history["epoch_seconds"].dropna() if "epoch_seconds" in result.history \
        else pd.Series(dtype=float)
    return {"train_seconds": result.train_seconds,
            "seconds_per_epoch": float(epochs.mean()) if len(epochs) else math.nan,
            "images_per_second": result.images_seen / max(result.train_seconds, 1e-9),
            "resumed_from_epoch": result.resumed_from_epoch}
