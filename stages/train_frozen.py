"""train_frozen: train the embedding head on a frozen backbone.

Backbone features of the train and val images are computed once (content-addressed cache shared
by every experiment), so an epoch costs seconds. With augmentation on, the frozen backbone runs on
every augmented view instead (slower, no cache; see README).

Reads:  params seed, lr, precision, device, data.image_size, model, train, train_frozen;
        data/split.csv, data/prepared
Writes: models/train_frozen/best.pt, plots/train_frozen/{history.csv,curves.png},
        metrics/details/train_frozen.json, metrics/train_frozen.json (the headline: val
        accuracy, best epoch), metrics/timing/train_frozen.json
"""

import numpy as np
import torch

from retrieval import (
    cache,
    config,
    data,
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

STAGE = "train_frozen"


def main() -> None:
    params = config.load_params()
    t, size = params.train, params.data.image_size
    table = data.load_split_table(paths.SPLIT_CSV, paths.DATASET_JSON)
    split = training.TrainingData.from_table(table)
    # Refused here, not mid-run: the loss's margin, and what its sampler needs (ntxent this
    # stage's augmentation, the in-batch losses enough classes in the train split).
    losses.check_params(params.train, augment=params.train_frozen.augment,
                        augment_key=f"{STAGE}.augment",
                        normalize=params.model.normalize,
                        train_labels=split.labels[split.train_idx])
    device = runtime.resolve_device(params.device)
    torch.manual_seed(params.seed)  # the head's (and a weights: none trunk's) initialisation
    net = runtime.prepare_model(models.EmbeddingNet(
        params.model, training.classifier_classes(t, split)), device)
    net.trunk.requires_grad_(False)
    keys = config.stage_params(STAGE)
    with tracking.stage_run(STAGE, config.select(params, keys),
                            config.flatten(config.to_dict(params))) as run:
        images = cache.images_for(table["file"].tolist(), size)
        if params.train_frozen.augment.enabled:
            encoder = training.ImageEncoder(net, images, size, params.train_frozen.augment,
                                            device, params.precision, frozen_trunk=True)
        else:
            needed = np.concatenate([split.train_idx, split.val_idx])
            key = training.feature_cache_key(net, images, needed, size, params.precision)
            features = cache.array_for(
                f"features-{key}",
                lambda: training.frozen_features(net, images, needed, size, device,
                                                 params.precision))
            full = torch.zeros((len(table), *features.shape[1:]))
            full[needed] = torch.from_numpy(features)
            encoder = training.FrozenEncoder(net, full, device)
        optimizer = training.build_optimizer(net, t.optimizer, params.lr, t.weight_decay,
                                             t.momentum)
        run_id = training.resume_fingerprint(config.select(params, keys), images.key)
        resume = training.ResumeSpec(workspace.cache_dir() / "resume" / f"{STAGE}-{run_id}.pt",
                                     run_id)
        result = training.fit(
            net, encoder, optimizer, split, t, epochs=params.train_frozen.epochs,
            seed=params.seed, resume=resume,
            on_epoch=lambda epoch, row: run.log_metrics(row, step=epoch),
            save_best=training.best_checkpoint_writer(paths.checkpoint(STAGE), STAGE, net, split,
                                                     size))
        pretrained = params.model.weights != "none"
        training.finish_stage(STAGE, paths.checkpoint(STAGE), net, result, split, size,
                              f"{STAGE}: {t.loss} loss, backbone frozen", run,
                              {"pretrained_weights": pretrained})
        run.set_tags({"pretrained_weights": pretrained})
        if params.tracking.log_models:
            publish.log_checkpoint(run, paths.checkpoint(STAGE), images, split.val_idx, STAGE)


if __name__ == "__main__":
    outputs.run_main(main)
