"""split: stratified (or class-disjoint) train/val/test split as one table, no copies.

Reads:  params seed, split.*; data/prepared/index.csv
Writes: data/split.csv (path, label, split, mask_path), metrics/details/split.json,
        plots/split/class_counts.csv
"""


from retrieval import config, data, outputs, paths, tracking

STAGE = "split"


def main() -> None:
    params = config.load_params()
    s = params.split
    index = outputs.read_table(paths.INDEX_CSV, ("path", "label", "mask_path"),
                               keep_default_na=False, dtype=str)
    with tracking.stage_run(STAGE, config.select(params, config.stage_params(STAGE)),
                            config.flatten(config.to_dict(params))) as run:
        fractions = (s.train, s.val, s.test)
        small: list[str] = []
        if s.mode == "stratified":
            table, small = data.stratified_split(index, fractions, params.seed, s.small_classes)
        else:
            table = data.class_disjoint_split(index, fractions, params.seed)
        data.check_retrieval_possible(table)
        counts = table.pivot_table(index="label", columns="split", values="path",
                                   aggfunc="count", fill_value=0)
        counts = counts.reindex(columns=list(data.SPLITS), fill_value=0).reset_index()
        outputs.write_csv(paths.SPLIT_CSV, table)
        outputs.write_csv(paths.plots(STAGE) / "class_counts.csv", counts)
        per_split = table.groupby("split")
        metrics = {"mode": s.mode, "small_classes": len(small), "small_class_rule": s.small_classes,
                   "small_class_names": small,
                   **{f"{name}_images": int(per_split.size().get(name, 0)) for name in data.SPLITS},
                   **{f"{name}_classes": int(per_split["label"].nunique().get(name, 0))
                      for name in data.SPLITS}}
        outputs.write_json(paths.details(STAGE), metrics)
        run.log_metrics(metrics)
        run.log_artifact(paths.plots(STAGE) / "class_counts.csv")


if __name__ == "__main__":
    outputs.run_main(main)
