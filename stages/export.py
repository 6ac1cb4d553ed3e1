"""export: the fine-tuned network as TorchScript and ONNX files, with their preprocessing.

Both files are written into a hidden folder, run on real test images against PyTorch in
float32, and only then moved into place: an export beyond its tolerance stops the stage with a
one-line error naming the format and the difference, and the previous export stays.

Reads:  params data.image_size, model, export; models/train_unfrozen/best.pt and
        threshold.json beside it (evaluate's decision threshold for it: this stage runs after
        evaluate, so preprocessing.json states the threshold compare uses), data/split.csv,
        data/prepared (the verification images, through the shared image cache)
Writes: models/export/{embedding.onnx, embedding.torchscript.pt, preprocessing.json},
        metrics/details/export.json (max |embedding difference| and size of each file); the export
        folder is logged as MLflow artifacts of the stage's run
"""

from retrieval import cache, config, data, export, models, outputs, paths, tracking

STAGE = "export"
SOURCE = "train_unfrozen"


def main() -> None:
    params = config.load_params()
    cfg, size = params.export, params.data.image_size
    checkpoint_path = paths.checkpoint(SOURCE)
    # The very model params.yaml describes, or a one-line refusal before anything is written.
    net, checkpoint = models.load_model(checkpoint_path, expected=params.model,
                                        image_size=size, writer=SOURCE)
    table = data.load_split_table(paths.SPLIT_CSV, paths.DATASET_JSON)
    with tracking.stage_run(STAGE, config.select(params, config.stage_params(STAGE)),
                            config.flatten(config.to_dict(params))) as run:
        images = export.verification_images(cache.images_for(table["file"].tolist(), size),
                                            table, cfg.verify_images, size, net)
        with outputs.atomic_folder(paths.EXPORT) as folder:
            files = export.export_model(net, checkpoint, checkpoint_path, size, folder,
                                        cfg.opset)
            differences = export.max_differences(net, files, images,
                                                 export.recorded_sha256(folder))
            export.check_tolerances(
                differences, {"onnx": cfg.onnx_tolerance,
                              "torchscript": cfg.torchscript_tolerance},
                {"onnx": "export.onnx_tolerance",
                 "torchscript": "export.torchscript_tolerance"})
            sizes = {name: path.stat().st_size for name, path in files.items()}
        metrics = {"verify_images": len(images), "opset": cfg.opset,
                   **{f"{name}_max_abs_diff": value for name, value in differences.items()},
                   **{f"{name}_bytes": value for name, value in sizes.items()}}
        outputs.write_json(paths.details(STAGE), metrics)
        run.log_metrics(metrics)
        run.log_artifact(paths.EXPORT, "export")
        print("\n".join(f"{name}: max |difference| {differences[name]:.2g}, "
                        f"{sizes[name] / 2**20:.1f} MiB" for name in differences))


if __name__ == "__main__":
    outputs.run_main(main)
