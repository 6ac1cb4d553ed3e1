"""Row 9: numerics and memory layout on the CPU: fp32 NCHW vs channels_last vs bf16 autocast.

Speed: the model itself (forward under inference_mode; forward + backward in train mode) on
pre-decoded Caltech-101 tensors, the three configurations interleaved.
Results: a small model trained inside the benchmark on the generated sample (the data the
pipeline's defaults are made for: it learns from scratch in a minute), twice from the same seed,
in fp32 and in bf16 autocast. Extraction: the fp32-trained model's embeddings in each
configuration; training: the bf16-trained model vs the fp32-trained one, both embedded in fp32.
Scores: val pair accuracy (seeded balanced val pairs, threshold chosen on them, as `fit`
reports it) and test precision@1 (every test image queries the other test images).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import common
import numpy as np
import torch

from retrieval import config, metrics, models, runtime, sampling, search, synthetic, training
from retrieval.cache import ImageCache
from retrieval.embed import run_batched

CPU = torch.device("cpu")
TRAIN_EPOCHS = 8
KERNELS = ("forward_training", "backward_data", "backward_weights")  # oneDNN's prop kinds
# The model, and the one the Caltech-101 pipeline of row 8 runs.
SPEED_MODELS = {False: [("resnet50", 224), ("resnet18", 160)], True: [("cifar_resnet", 32)]}
CONFIGS = {"fp32 NCHW": ("fp32", False), "fp32 channels_last": ("fp32", True),
           "bf16 channels_last": ("bf16", True)}


# --- speed -------------------------------------------------------------------------------------

def layouts(net: torch.nn.Module, inputs: torch.Tensor) -> dict[bool, tuple]:
    """(model, inputs) in NCHW (False) and channels_last (True)."""
    nchw = copy.deepcopy(net).to(memory_format=torch.contiguous_format)
    return {False: (nchw, inputs.contiguous()),
            True: (runtime.prepare_model(copy.deepcopy(net), CPU),
                   inputs.contiguous(memory_format=torch.channels_last))}


def forward(model, inputs, batch, precision) -> None:
    model.eval()
    with torch.inference_mode(), runtime.autocast(CPU, precision):
        for start in range(0, len(inputs), batch):
            model(inputs[start:start + batch])


def forward_backward(model, inputs, batch, precision) -> None:
    model.train()
    for start in range(0, len(inputs), batch):
        with runtime.autocast(CPU, precision):
            loss = model(inputs[start:start + batch], normalize=False).float().square().mean()
        model.zero_grad(set_to_none=True)
        loss.backward()


def speeds(backbone: str, size: int, quick: bool, workdir: Path) -> dict[str, float]:
    """Images per second of each task x configuration, interleaved, best of the rounds."""
    batch, n_eval, n_train, rounds = (16, 32, 16, 1) if quick else (32, 96, 32, 2)
    images, _ = common.image_cache(n_eval, size, seed=9, workdir=workdir)
    net = common.embedding_net(backbone)
    encoder = training.ImageEncoder(net, images, size, config.AugmentConfig(), CPU, "fp32")
    inputs = encoder.inputs(np.arange(len(images)))
    nets = layouts(net, inputs)
    sides = {}
    for name, (precision, channels_last) in CONFIGS.items():
        model, x = nets[channels_last]
        sides[f"extract {name}"] = lambda m=model, x=x, p=precision: forward(m, x, batch, p)
        sides[f"train {name}"] = (lambda m=model, x=x[:n_train], p=precision:
                                  forward_backward(m, x, batch, p))
    times = common.interleaved(sides, rounds)
    return {name: common.rate(n_eval if name.startswith("extract") else n_train, t)
            for name, t in times.items()}


# --- results -----------------------------------------------------------------------------------

def largest_classes_data(quick: bool, workdir: Path) -> dict:
    """The largest Caltech-101 classes (distinct objects: learnable from scratch in a minute),
    split 60 / 20 / 20 per class; the generated sample where Caltech is absent or in quick mode."""
    classes, per_class, size = (4, 12, 32) if quick else (10, 60, 64)
    if quick or not common.caltech_available():
        folder = workdir / f"sample-{classes}x{per_class}"
        if not folder.exists():
            synthetic.generate(folder, n_classes=classes, images_per_class=per_class,
                               image_size=96, seed=0)
        paths = sorted((folder / "images").glob("*/*.png"))
    else:
        rng = np.random.default_rng(0)
        folders = sorted((f for f in common.CALTECH.iterdir() if f.is_dir()
                          and f.name != "BACKGROUND_Google"),
                         key=lambda f: -len(list(f.glob("*.jpg"))))[:classes]
        paths = [p for f in sorted(folders) for p in
                 sorted(rng.choice(sorted(f.glob("*.jpg")), per_class, replace=False))]
    labels = common.image_labels(paths)
    rng = np.random.default_rng(0)
    split = np.empty(len(paths), dtype=object)
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        cut = np.round(np.array([0.6, 0.8]) * len(members)).astype(int)
        split[members[:cut[0]]], split[members[cut[0]:cut[1]]] = "train", "val"
        split[members[cut[1]:]] = "test"
    images = ImageCache.build(paths, size, workdir / "images", progress=False)
    return {"images": images, "labels": labels, "size": size, "quick": quick,
            "classes": len(np.unique(labels)),
            **{name: np.flatnonzero(split == name) for name in ("train", "val", "test")}}


def train_model(data: dict, precision: str, workdir: Path):
    """resnet18 (cifar_resnet in quick mode) from scratch: class-balanced batches, a linear
    classifier on the embedding (cross_entropy: the loss that learns fastest from scratch)."""
    torch.manual_seed(0)
    model_cfg = config.ModelConfig(backbone="cifar_resnet" if data["quick"] else "resnet18",
                                   weights="none", cifar_n=1, hidden_dim=256, embedding_dim=64)
    net = runtime.prepare_model(models.EmbeddingNet(model_cfg, data["classes"]), CPU)
    augment = config.AugmentConfig(enabled=True, crop_scale_min=0.7, color_jitter=0.1)
    encoder = training.ImageEncoder(net, data["images"], data["size"], augment, CPU, precision)
    cfg = config.TrainConfig(loss="cross_entropy", images_per_class=4, val_pairs=200,
                             batch_size=4 * min(8, data["classes"]),
                             threshold_criterion="accuracy")
    optimizer = training.build_optimizer(net, "adam", 1e-3, 1e-4, 0.9)
    with tempfile.TemporaryDirectory(dir=workdir) as temp:
        split = training.TrainingData(data["labels"], [], data["train"], data["val"])
        result = training.fit(net, encoder, optimizer, split, cfg,
                              epochs=TRAIN_EPOCHS if not data["quick"] else 1, seed=0,
                              resume=training.ResumeSpec(Path(temp) / "resume.pt", "bench"))
    net.load_state_dict(result.best_state)
    return net.eval()


def embed(net, data: dict, rows: np.ndarray, precision: str, channels_last: bool) -> np.ndarray:
    model = net if channels_last else copy.deepcopy(net).to(memory_format=torch.contiguous_format)
    layout = (lambda x: x) if channels_last else (lambda x: x.contiguous())
    return run_batched(lambda x: model(layout(x)), data["images"], rows, data["size"], CPU,
                       precision, net.normalization)


def scores(net, data: dict, precision: str, channels_last: bool,
           reference: dict | None = None) -> dict:
    """Val pair accuracy, test P@1 and, against a reference run, how many test queries keep
    their nearest neighbour and the mean cosine between the two runs' embeddings."""
    val, test, labels = data["val"], data["test"], data["labels"]
    z_val = embed(net, data, val, precision, channels_last)
    pairs = sampling.sample_pairs(labels[val], 1000, seed=0, epoch=0)
    distances = np.linalg.norm(z_val[pairs[:, 0]] - z_val[pairs[:, 1]], axis=1)
    threshold = metrics.choose_threshold(distances, pairs[:, 2], "accuracy")
    accuracy = training.pair_metrics(distances, pairs[:, 2], threshold)["accuracy"]
    z_test = embed(net, data, test, precision, channels_last)
    _, nearest = search.knn(z_test, z_test, 1, exclude_self=True)
    out = {"val_pair_accuracy": float(accuracy),
           "test_precision_at_1": float((labels[test][nearest[:, 0]] == labels[test]).mean()),
           "nearest": nearest[:, 0], "z_test": z_test}
    if reference is not None:
        out["same_nearest_neighbour"] = float((nearest[:, 0] == reference["nearest"]).mean())
        out["cosine_to_reference"] = float((z_test * reference["z_test"]).sum(1).mean())
    return out


REFERENCE = "trained fp32, embedded fp32 channels_last"
EMBEDDED_BF16 = "trained fp32, embedded bf16 channels_last"
TRAINED_BF16 = "trained bf16, embedded fp32 channels_last"


def results(quick: bool, workdir: Path) -> tuple[dict[str, dict[str, float]], dict]:
    data = largest_classes_data(quick, workdir)
    fp32_model = train_model(data, "fp32", workdir)
    bf16_model = train_model(data, "bf16", workdir)
    reference = scores(fp32_model, data, "fp32", True)
    out = {f"trained fp32, embedded {name}": scores(fp32_model, data, precision, channels_last,
                                                    reference)
           for name, (precision, channels_last) in CONFIGS.items()}
    out[TRAINED_BF16] = scores(bf16_model, data, "fp32", True, reference)
    for record in out.values():  # keep the numbers, drop the arrays
        record.pop("nearest", None), record.pop("z_test", None)
    return out, {"classes": data["classes"], "images": len(data["labels"]),
                 "test_images": len(data["test"]), "size": data["size"]}


_PROFILE_STEP = """
import sys, torch
sys.path.insert(0, sys.argv[1])
import common, numerics
net = numerics.runtime.prepare_model(common.embedding_net(sys.argv[2]), numerics.CPU)
x = torch.randn(32, 3, int(sys.argv[3]), int(sys.argv[3]))
x = x.contiguous(memory_format=torch.channels_last)
numerics.forward_backward(net, x, 32, sys.argv[4])  # creates the primitives
print("PROFILE-START", flush=True)
numerics.forward_backward(net, x, 32, sys.argv[4])
"""


def onednn_profile(backbone: str, size: int) -> dict[str, dict[str, float]]:
    """oneDNN's own profile (ONEDNN_VERBOSE) of one training step of 32: milliseconds spent in
    convolution forward, backward-data and backward-weights kernels, per precision."""
    out = {}
    for precision in ("fp32", "bf16"):
        log = subprocess.run([sys.executable, "-c", _PROFILE_STEP, str(Path(__file__).parent),
                              backbone, str(size), precision], capture_output=True, text=True,
                             env={**os.environ, "ONEDNN_VERBOSE": "1"}, check=True).stdout
        kinds: dict[str, float] = {}
        for line in log.split("PROFILE-START", 1)[-1].splitlines():
            fields = line.split(",")
            if len(fields) > 8 and fields[3] == "exec" and fields[5] == "convolution":
                kinds[fields[7]] = kinds.get(fields[7], 0.0) + float(fields[-1])
        out[precision] = kinds
    return out


def bf16_training_notes(speed: list[dict]) -> list[str]:
    """Where bf16 autocast makes training slower than fp32 channels_last, say so, with a profile."""
    notes = []
    for model in dict.fromkeys(r["model"] for r in speed):
        rate = {r["config"]: r["images_per_s"] for r in speed
                if r["model"] == model and r["task"] == "train"}
        if rate["bf16 channels_last"] >= rate["fp32 channels_last"]:
            continue
        backbone, size = model.split()[0], int(model.split()[1])
        profile = onednn_profile(backbone, size)
        slower = [k for k in KERNELS if profile["bf16"].get(k, 0) > profile["fp32"].get(k, 0)]
        notes.append(
            f"In this run bf16 autocast trained {model} slower than fp32 channels_last: "
            f"{rate['bf16 channels_last']:.1f} against {rate['fp32 channels_last']:.1f} "
            "images/s. oneDNN's own profile of one training step of 32 taken right after "
            "(ONEDNN_VERBOSE; convolution forward / backward-data / backward-weights): "
            + " / ".join(f"{profile['bf16'].get(k, 0):.0f}" for k in KERNELS)
            + " ms in bf16 against " + " / ".join(f"{profile['fp32'].get(k, 0):.0f}"
                                                   for k in KERNELS) + " ms in fp32. "
            + (f"The bf16 {' and '.join(slower)} kernels are the slow part (this CPU has "
               "AVX-512 BF16 but no AMX). " if slower else
               "bf16 is faster in every kernel there, so the slowdown depends on the load: "
               "the machine is shared, and bf16's backward-weights kernels lose far more than "
               "fp32's when other processes take the cores. ")
            + "`precision` is one param for extraction and training; a training-only "
            "override would let a busy or AMX-less CPU train in fp32 and still extract in bf16.")
    return notes


def speed_table(quick: bool, workdir: Path) -> list[dict]:
    rows = []
    for backbone, size in SPEED_MODELS[quick]:
        rates = speeds(backbone, size, quick, workdir)
        for task in ("extract", "train"):
            for name in CONFIGS:
                rate = rates[f"{task} {name}"]
                rows.append({"model": f"{backbone} {size} px", "task": task, "config": name,
                             "images_per_s": rate,
                             "speedup": rate / rates[f"{task} fp32 NCHW"]})
    return rows


def run(quick: bool, workdir: Path) -> common.Result:
    speed = speed_table(quick, workdir)
    scored, data = results(quick, workdir)
    reference = scored[REFERENCE]
    for record in scored.values():
        record.update({f"{k}_change_points": 100 * (record[k] - reference[k])
                       for k in ("val_pair_accuracy", "test_precision_at_1")})
    first = speed[0]["model"]  # the model: resnet50 at 224 px
    pick = {(r["task"], r["config"]): r for r in speed if r["model"] == first}
    bf16_extract, bf16_scores = pick["extract", "bf16 channels_last"], scored[EMBEDDED_BF16]
    prepared = runtime.prepare_model(common.embedding_net("resnet18"), CPU)
    channels_last_default = next(prepared.parameters()).is_contiguous(
        memory_format=torch.channels_last)  # the first conv's weight, as every stage runs it
    passed = (bf16_extract["speedup"] >= 2.5 and channels_last_default
              and abs(bf16_scores["test_precision_at_1_change_points"]) <= 1)
    train_bf16 = scored[TRAINED_BF16]
    return common.Result(
        row=9, name="numerics",
        what="Numerics and layout: channels_last and bf16 autocast vs fp32 NCHW",
        conditions=(f"speed: {' and '.join(m for m, _ in _models(speed))}, batch 32, "
                    f"{torch.get_num_threads()} threads, pre-decoded Caltech-101; results: "
                    f"resnet18 trained inside the benchmark ({TRAIN_EPOCHS} epochs, "
                    f"cross-entropy, from one seed in fp32 and in bf16) on the {data['classes']} "
                    f"largest Caltech-101 classes at {data['size']} px ({data['images']} "
                    f"images, {data['test_images']} test queries)"
                    if not quick else "quick sizes"),
        figure=(f"{first} extraction: channels_last "
                f"{pick['extract', 'fp32 channels_last']['speedup']:.1f}×, bf16 "
                f"{bf16_extract['speedup']:.1f}× (P@1 "
                f"{bf16_scores['test_precision_at_1_change_points']:+.1f} pt, val acc "
                f"{bf16_scores['val_pair_accuracy_change_points']:+.1f} pt, same nearest "
                f"neighbour {bf16_scores['same_nearest_neighbour']:.0%}); training: bf16 "
                f"{pick['train', 'bf16 channels_last']['speedup']:.1f}× (model trained in "
                f"bf16: P@1 {train_bf16['test_precision_at_1_change_points']:+.1f} pt)"),
        target="≥ 2.5× for bf16 extraction with P@1 within 1 point; channels_last on by default",
        passed=passed, details={"speed": speed, "scores": scored, "data": data,
                                "channels_last_default": channels_last_default},
        notes=bf16_training_notes(speed) if not quick else [])


def _models(speed: list[dict]) -> list[tuple[str, None]]:
    return [(m, None) for m in dict.fromkeys(r["model"] for r in speed)]
