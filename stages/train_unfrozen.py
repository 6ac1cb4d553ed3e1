"""train_unfrozen: fine-tune the whole network (or its last stages) end to end.

Starts from the best train_frozen model (train_unfrozen.init: frozen) or from scratch, with the
backbone at lr * backbone_lr_mult, augmentation on cached uint8 images, bf16 autocast and
channels_last where supported. With train_unfrozen.processes: N > 1 the stage launches itself
under torchrun (retrieval.launch) as N DistributedDataParallel processes (gloo on CPU, nccl on
CUDA), as `torchrun --nproc_per_node=N stages/train_unfrozen.py` by hand does; rank 0 alone logs
and writes checkpoints and outputs.

Reads:  params seed, lr, precision, device, data.image_size, model, train, train_unfrozen;
        data/split.csv, data/prepared, models/train_frozen/best.pt
Writes: models/train_unfrozen/best.pt, plots/train_unfrozen/{history.csv,curves.png},
        metrics/details/train_unfrozen.json, metrics/train_unfrozen.json (the headline: val
        accuracy, best epoch), metrics/timing/train_unfrozen.json
"""

import contextlib
import sys

import pandas as pd
import torch

from retrieval import (
    cache,
    config,
    data,
    launch,
    losses,
    models,
    outputs,
    paths,
    publish,
    runtime,
    tracking,
    training,
    workspace,
)

STAGE = "train_unfrozen"


def main() -> None:
    params = config.load_params()
    table, split = checked_split(params)  # bad params are refused once, before any launch
    code = launch.run_workers(__file__, params.train_unfrozen.processes,
                              f"{STAGE}.processes", params.device)
    if code is not None:
        sys.exit(code)
    train(params, table, split)


def checked_split(params: config.Params) -> tuple[pd.DataFrame, training.TrainingData]:
    """The split table and training data, once the loss's params fit them: the loss's margin,
    and what its sampler needs (ntxent this stage's augmentation, the in-batch losses enough
    classes in the train split)."""
    table = data.load_split_table(paths.SPLIT_CSV, paths.DATASET_JSON)
    split = training.TrainingData.from_table(table)
    losses.check_params(params.train, augment=params.train_unfrozen.augment,
                        augment_key=f"{STAGE}.augment", normalize=params.model.normalize,
                        train_labels=split.labels[split.train_idx])
    return table, split


def train(params: config.Params, table: pd.DataFrame, split: training.TrainingData) -> None:
    t, u, size = params.train, params.train_unfrozen, params.data.image_size
    device = runtime.resolve_device(params.device)
    runtime.init_distributed(device)
    torch.manual_seed(params.seed)
    if u.init == "frozen":
        # The very model params.yaml describes (and MLflow logs), or a refusal before training.
        net, _ = models.load_model(paths.checkpoint("train_frozen"), expected=params.model,
                                   image_size=size, writer="train_frozen")
    else:
        net = models.EmbeddingNet(params.model,
                                  training.classifier_classes(t, split))
    models.set_trunk_trainable(net, u.unfreeze_from, u.batchnorm)
    net = runtime.prepare_model(net, device)
    model = (torch.nn.parallel.DistributedDataParallel(net) if runtime.world_size() > 1
             else net)
    keys = config.stage_params(STAGE)
    tracked = (tracking.stage_run(STAGE, config.select(params, keys),
                                  config.flatten(config.to_dict(params)))
               if runtime.is_main_process() else contextlib.nullcontext())
    with tracked as run:
        images = cache.images_for(table["file"].tolist(), size,
                                  progress=runtime.is_main_process())
        encoder = training.ImageEncoder(model, images, size, u.augment, device, params.precision)
        optimizer = training.build_optimizer(net, t.optimizer, params.lr, t.weight_decay,
                                             t.momentum, u.backbone_lr_mult)
        run_id = training.resume_fingerprint(config.select(params, keys), images.key,
                                             runtime.world_size())
        resume = training.ResumeSpec(workspace.cache_dir() / "resume" / f"{STAGE}-{run_id}.pt",
                                     run_id)
        result = training.fit(
            net, encoder, optimizer, split, t, epochs=u.epochs, seed=params.seed, resume=resume,
            on_epoch=lambda epoch, row: run.log_metrics(row, step=epoch),
            save_best=training.best_checkpoint_writer(paths.checkpoint(STAGE), STAGE, net, split,
                                                     size))
        if runtime.is_main_process():
            training.finish_stage(STAGE, paths.checkpoint(STAGE), net, result, split, size,
                                  f"{STAGE}: {t.loss} loss, backbone from {u.unfreeze_from}",
                                  run, {"pretrained_weights": params.model.weights != "none"})
            if params.tracking.log_models:
                publish.log_checkpoint(run, paths.checkpoint(STAGE), images, split.val_idx,
                                       STAGE)
    runtime.shutdown_distributed()


if __name__ == "__main__":
    outputs.run_main(main)
