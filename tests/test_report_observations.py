"""The report's sentences, from hand-made numbers whose expected wording is worked out here."""

from __future__ import annotations

import pandas as pd

from retrieval.report import observations as obs
from retrieval.report.inputs import Inputs
from tests.report_data import EVALUATE, FROZEN_HISTORY, METRICS, UNFROZEN_HISTORY, history


def test_fine_tuning_raised_map():
    notes = obs.map_steps(Inputs(metrics={"evaluate": EVALUATE}))
    sentence = next(n for n in notes if n.startswith("Fine-tuning"))
    assert "raised test mAP from 0.410 to 0.580" in sentence and "+0.170" in sentence
    # The bootstrap intervals [0.39, 0.43] and [0.56, 0.60] are disjoint.
    assert "do not overlap" in sentence


def test_lowered_and_overlapping():
    scores = {"frozen": {"map": 0.5, "map_ci_low": 0.45, "map_ci_high": 0.55},
              "unfrozen": {"map": 0.48, "map_ci_low": 0.43, "map_ci_high": 0.53}}
    (sentence,) = obs.map_steps(Inputs(metrics={"evaluate": scores}))
    assert "lowered test mAP from 0.500 to 0.480" in sentence and "overlap" in sentence
    assert obs.precision_at_1_steps(Inputs(metrics={"evaluate": scores})) == []


def test_learning_rate_reductions_are_counted_from_the_history():
    frozen = Inputs(histories={"train_frozen": FROZEN_HISTORY})
    assert obs.lr_schedule(frozen) == [
        "train_frozen: the learning rate was reduced twice (0.001 to 0.0005 at epoch 4; 0.0005 "
        "to 0.00025 at epoch 8)."]
    effects = obs.lr_effects(frozen)
    # Best before epoch 4: 0.16 (epoch 3); from epoch 4 to 7 it reached 0.1234 at epoch 7.
    assert "improved on its previous best 0.160, reaching 0.123 at epoch 7" in effects[0]
    assert "did not go below its previous best 0.123" in effects[1]
    flat = Inputs(histories={"train_frozen": history([0.01] * 3, [0.3, 0.2, 0.1])})
    assert obs.lr_schedule(flat)[0].startswith(
        "train_frozen: the learning rate stayed at 0.01 for all 2 epochs")
    assert obs.lr_effects(flat) == []


def test_validation_loss_stopped_improving():
    frozen = Inputs(metrics={"train_frozen": METRICS["train_frozen"]},
                    histories={"train_frozen": FROZEN_HISTORY})
    assert obs.stopping(frozen) == [
        "train_frozen: validation loss stopped improving at epoch 7 (0.123); early stopping "
        "ended training at epoch 10, 3 epochs later."]
    assert "rose from 0.123 to 0.140 after epoch 7" in obs.loss_trend(frozen)[0]  # over-fitting
    assert "raised validation pair accuracy from 0.520 to 0.710" in \
        obs.accuracy_change(frozen)[0]
    # Epoch 7: train accuracy 0.5 + 0.03 * 7 = 0.71, validation 0.5 + 0.02 * 7 = 0.64.
    assert "train accuracy (0.710) is 0.070 above validation accuracy (0.640)" in \
        obs.accuracy_gap(frozen)[0]
    still = Inputs(histories={"train_unfrozen": UNFROZEN_HISTORY.iloc[:4]})
    assert "still improving at the last epoch (3" in obs.stopping(still)[0]
    never = Inputs(histories={"train_unfrozen": history([1e-3] * 3, [0.1, 0.2, 0.3])})
    assert "never went below its starting value 0.100 (epoch 0" in obs.stopping(never)[0]


def test_frozen_vs_unfrozen_and_collapse():
    both = Inputs(metrics={s: METRICS[s] for s in ("train_frozen", "train_unfrozen")})
    assert obs.frozen_vs_unfrozen(both) == [
        "Fine-tuning the backbone lowered the best validation loss from 0.123 to 0.101 (frozen "
        "to unfrozen).", "Fine-tuning raised validation pair F1 from 0.690 to 0.750."]
    alarm = FROZEN_HISTORY.assign(collapse_alarm=[0] * 9 + [1, 1])
    assert obs.collapse(Inputs(histories={"train_frozen": alarm})) == [
        "train_frozen: the embedding-collapse alarm was raised at epoch(s) 9, 10 (embeddings "
        "nearly identical)."]


def test_other_observations_use_the_numbers():
    inputs = Inputs(metrics=METRICS)
    (silhouettes,) = obs.silhouettes(inputs)
    assert "baseline -0.052, frozen 0.137, unfrozen 0.291" in silhouettes
    assert "raised the silhouette from -0.052 to 0.291" in obs.silhouette_changes(inputs)[1]
    assert obs.overlapping_classes(inputs) == []  # the best silhouette, 0.291, is above 0.1
    iou = obs.saliency_iou(inputs)
    assert "unfrozen: gradcam" in iou[2] and "0.533, above the ellipse baseline (0.384) " \
        "by 0.149" in iou[2]
    assert "0.311, below the ellipse baseline" in iou[0]
    assert "refined by grabcut:10/30" in iou[2] and "classifies 0.833 of the test" in iou[2]
    assert obs.saliency_changes(inputs)[1] == ("Training end to end (baseline to unfrozen) "
                                               "raised the best saliency IoU from 0.311 to "
                                               "0.533.")
    assert obs.roc_auc(inputs) == ["ROC AUC of pair verification: baseline 0.612, frozen 0.744, "
                                   "unfrozen 0.861; the best is unfrozen."]
    assert obs.hardest_classes(inputs) == ["The best model by test mAP is unfrozen (0.580); its "
                                           "hardest classes (lowest P@1) are b, a."]
    (normalisation, _) = obs.normalization(inputs)
    assert "largest |mean| 0.267 in B" in normalisation and "passed" in normalisation
    failing = dict(METRICS["verify_normalization"], normalized_mean_g=1.5)
    assert obs.normalization(Inputs(metrics={"verify_normalization": failing}))[0].endswith(
        "FAILED.")
    no_masks = {"iou_computed": False, "reason": "No masks."}
    assert obs.saliency_iou(Inputs(metrics={"gradcam_segment": no_masks})) == ["No masks."]
    assert obs.saliency_changes(Inputs(metrics={"gradcam_segment": no_masks})) == []


def test_data_observations():
    inputs = Inputs(metrics={"prepare": METRICS["prepare"], "split": METRICS["split"]},
                    excluded=pd.DataFrame({"path": ["a/bad.jpg"], "reason": ["not an image"]}))
    assert obs.dataset(inputs)[:2] == [
        "The dataset has 120 images in 3 classes; class sizes range from 30 to 50 images (the "
        "largest is 1.7x the smallest).", "1 files were excluded: 1 not an image."]
    # 84 / 120 = 70 %, 18 / 120 = 15 %.
    assert "84 / 18 / 18 images in train / val / test (70.0 / 15.0 / 15.0 %)" in \
        obs.split(inputs)[0]


# --- experiments: what the varied parameter did to the headline metric ------------------------


def experiments(rows: list[tuple], columns: tuple[str, ...] = ("lr",)) -> Inputs:
    """A hand-made `experiments_table`: (run, commit, *parameters, unfrozen mAP) per row, best
    first as the real table is."""
    table = pd.DataFrame(rows, columns=["run", "commit", *columns, "unfrozen mAP"])
    table.insert(len(table.columns) - 1, "frozen mAP", table["unfrozen mAP"] - 0.1)
    return Inputs(experiments=table.sort_values("unfrozen mAP", ascending=False,
                                                kind="stable").reset_index(drop=True))


def test_three_experiments_that_differ_only_in_lr():
    inputs = experiments([("a", "c1", "3e-4", 0.65), ("b", "c1", "1e-4", 0.71),
                          ("c", "c1", "3e-3", 0.52)])
    assert obs.parameter_effects(inputs) == [
        "Across 3 experiments that differ only in lr, the fine-tuned test mAP was highest at "
        "lr=1e-4 (0.710) and lowest at lr=3e-3 (0.520); every value: lr=1e-4: 0.710, "
        "lr=3e-4: 0.650, lr=3e-3: 0.520."]
    assert obs.best_run(inputs) == [
        "Across 3 pipeline runs recorded in MLflow, the highest unfrozen test mAP, 0.710, came "
        "from the run b with lr=1e-4; the lowest was 0.520."]


def test_two_parameters_each_compared_with_the_other_held_fixed():
    # lr varies at batch_size 32 (runs a, b); batch_size varies at lr 1e-4 (runs a, c).
    inputs = experiments([("a", "c1", "1e-4", "32", 0.70), ("b", "c1", "1e-3", "32", 0.60),
                          ("c", "c1", "1e-4", "64", 0.65)], ("lr", "batch_size"))
    assert obs.parameter_effects(inputs) == [
        "Across 2 experiments that differ only in lr (batch_size=32), the fine-tuned test mAP "
        "was highest at lr=1e-4 (0.700) and lowest at lr=1e-3 (0.600).",
        "Across 2 experiments that differ only in batch_size (lr=1e-4), the fine-tuned test mAP "
        "was highest at batch_size=32 (0.700) and lowest at batch_size=64 (0.650)."]


def test_repeats_are_averaged_and_ties_said_so():
    # lr=1e-4 twice: (0.70 + 0.60) / 2 = 0.65 against 0.50.
    repeated = experiments([("a", "c1", "1e-4", 0.70), ("b", "c1", "1e-4", 0.60),
                            ("c", "c1", "1e-3", 0.50)])
    assert obs.parameter_effects(repeated) == [
        "Across 3 experiments that differ only in lr, the fine-tuned test mAP was highest at "
        "lr=1e-4 (0.650) and lowest at lr=1e-3 (0.500) (repeated runs averaged)."]
    tied = experiments([("a", "c1", "1e-4", 0.5), ("b", "c1", "1e-3", 0.5)])
    assert obs.parameter_effects(tied) == [
        "Across 2 experiments that differ only in lr, the fine-tuned test mAP was 0.500 at every "
        "lr."]


def test_no_claim_when_the_runs_differ_in_more_than_the_parameter():
    other_code = experiments([("a", "c1", "1e-4", 0.7), ("b", "c2", "1e-3", 0.6)])
    assert obs.parameter_effects(other_code) == []  # different commits: different code
    both_vary = experiments([("a", "c1", "1e-4", "32", 0.7), ("b", "c1", "1e-3", "64", 0.6)],
                            ("lr", "batch_size"))
    assert obs.parameter_effects(both_vary) == []
    hidden = experiments([("a", "c1", "1e-4", 0.7), ("b", "c1", "1e-3", 0.6)])
    hidden.experiments.attrs["parameters_not_shown"] = 1  # experiments_table dropped one
    assert obs.parameter_effects(hidden) == []
    assert obs.parameter_effects(experiments([("a", "c1", "1e-4", 0.7)])) == []  # one run
    assert obs.parameter_effects(Inputs()) == [] and obs.best_run(Inputs()) == []


def test_class_shapes_come_from_the_numbers():
    def embed_viz(loss="cross_entropy", **frozen):
        return Inputs(metrics={"embed_viz": {"baseline": {"radial_elongation": None,
                                                          "silhouette": 0.1},
                                             "frozen": {"embedding_dim": 2, **frozen}}},
                      params={"train.loss": loss})

    (spokes,) = obs.class_shapes(embed_viz(radial_elongation=6.2, silhouette=0.21,
                                           silhouette_cosine=0.64, class_shape="radial spokes"))
    assert spokes.startswith("The 2-d frozen embedding (raw head output) puts its classes in "
                             "radial spokes: each class spreads 6.2× more along its mean "
                             "direction than across it; its classes separate by direction more "
                             "than by position (cosine silhouette 0.640, Euclidean 0.210)")
    (blobs,) = obs.class_shapes(embed_viz(radial_elongation=1.1, silhouette=0.7,
                                          silhouette_cosine=0.5, class_shape="compact clusters"))
    assert "in compact clusters: each class spreads 1.1×" in blobs and "by position (" in blobs
    assert "cross entropy" not in blobs and "distance loss" not in blobs  # not this run's cause
    assert "as cross entropy makes them" in spokes
    (blobs,) = obs.class_shapes(embed_viz("inbatch_contrastive", radial_elongation=0.9,
                                          silhouette=0.6, silhouette_cosine=0.5,
                                          class_shape="compact clusters"))
    assert blobs.endswith("as a distance loss (inbatch_contrastive) makes them: same-class "
                          "points are pulled to one place.")
    assert obs.class_shapes(embed_viz()) == []  # unit vectors, or an older metrics file
    assert obs.class_shapes(Inputs()) == []
    (overlap,) = obs.class_shapes(embed_viz(radial_elongation=3.1, silhouette=-0.11,
                                            silhouette_cosine=-0.37,
                                            class_shape="overlapping classes"))
    assert "does not separate its classes (silhouette -0.110, cosine -0.370)" in overlap


def test_training_widened_the_cosine_gap():
    # Fixture gaps: baseline 0.812 - 0.700 = 0.112, frozen 0.350, unfrozen 0.700 - 0.090 = 0.610.
    notes = obs.similarity_gap(Inputs(metrics={"evaluate": EVALUATE}))
    assert notes == [
        "Training widened the gap between same-class and different-class cosine similarity "
        "from 0.112 (baseline) to 0.350 (frozen): same-class mean 0.812 to 0.750, "
        "different-class mean 0.700 to 0.400.",
        "Training widened the gap between same-class and different-class cosine similarity "
        "from 0.112 (baseline) to 0.610 (unfrozen): same-class mean 0.812 to 0.700, "
        "different-class mean 0.700 to 0.090."]


def test_cosine_gap_narrowed_missing_or_not_positive():
    def entry(same: float, different: float) -> dict:
        return {"cosine_same_mean": same, "cosine_different_mean": different,
                "cosine_gap": same - different}

    narrowed = {"baseline": entry(0.6, 0.3), "unfrozen": entry(0.5, 0.55)}  # no frozen entry
    notes = obs.similarity_gap(Inputs(metrics={"evaluate": narrowed}))
    assert notes[0].startswith("Training narrowed the gap between same-class and "
                               "different-class cosine similarity from 0.300 (baseline) to "
                               "-0.050 (unfrozen)")
    assert notes[1].startswith("The unfrozen model's different-class test pairs are on average "
                               "at least as similar as its same-class pairs (gap -0.050)")
    assert len(notes) == 2
    no_baseline = {"frozen": entry(0.7, 0.2), "unfrozen": entry(0.8, 0.1)}
    assert obs.similarity_gap(Inputs(metrics={"evaluate": no_baseline})) == [
        "The gap between same-class and different-class cosine similarity of the test pairs: "
        "frozen 0.500, unfrozen 0.700 (no untrained baseline model to compare with)."]
    only_baseline = {"baseline": entry(0.7, 0.6)}
    assert "baseline 0.100 (no trained model to compare with)" in \
        obs.similarity_gap(Inputs(metrics={"evaluate": only_baseline}))[0]
    unchanged = {"baseline": entry(0.7, 0.6), "frozen": entry(0.8, 0.7)}
    assert obs.similarity_gap(Inputs(metrics={"evaluate": unchanged}))[0].startswith(
        "Training left the gap between same-class and different-class cosine similarity "
        "unchanged at 0.100")
    older = {m: {k: v for k, v in s.items() if not k.startswith("cosine_")}
             for m, s in EVALUATE.items()}  # an evaluate.json from before the cosine metrics
    assert obs.similarity_gap(Inputs(metrics={"evaluate": older})) == []
    assert obs.similarity_gap(Inputs()) == []
