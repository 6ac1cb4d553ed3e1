"""prepare: generate the sample dataset, write the bundled digits, or point at a real folder
(sources.SOURCES), and index it.

Reads:  params seed, data.*; the dataset folder (read-only) when data.source is 'folder'
Writes: data/prepared/{sample/, index.csv, excluded.csv, dataset.json}, metrics/details/prepare.json
"""

from retrieval import config, data, outputs, paths, sources, tracking, workspace

STAGE = "prepare"


def main() -> None:
    params = config.load_params()
    d = params.data
    with tracking.stage_run(STAGE, config.select(params, config.stage_params(STAGE)),
                            config.flatten(config.to_dict(params))) as run:
        location = sources.locate_dataset(
            d, workspace.resolve(d.root) if d.root else None,
            workspace.resolve(d.masks) if d.masks else None, paths.PREPARED / "sample",
            params.seed)
        result = data.index_folder(location.root, location.masks)
        outputs.write_csv(paths.INDEX_CSV, result.index)
        outputs.write_csv(paths.EXCLUDED_CSV, result.excluded)
        outputs.write_json(paths.DATASET_JSON, {
            "root": str(location.root), "masks": str(location.masks or ""), "source": d.source})
        counts = result.index["label"].value_counts()
        metrics = {"images": len(result.index), "classes": len(counts),
                   "excluded": len(result.excluded),
                   "excluded_files": result.excluded["path"].tolist(),
                   "images_with_mask": int((result.index["mask_path"] != "").sum()),
                   "missing_masks": result.missing_masks,
                   "mismatched_masks": result.mismatched_masks,
                   **result.counts,
                   "min_class_size": int(counts.min()), "max_class_size": int(counts.max())}
        outputs.write_json(paths.details(STAGE), metrics)
        run.log_metrics(metrics)
        run.log_artifact(paths.EXCLUDED_CSV)


if __name__ == "__main__":
    outputs.run_main(main)
