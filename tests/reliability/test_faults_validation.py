"""Reliability, class "params that validation lets through and a stage then dies on" (issue 16).

Every constraint a stage relies on is checked before any work, in one line naming the key:
ranges that would overflow (seed), allocate without bound (dimensions, pair counts), make a loss
meaningless (temperature, margin), batches a loss's sampler cannot form from the split at hand,
and strings that go into an MLflow query. Each case runs the real stage script (in-process, see
``run_script``) in a repository where prepare, split and train_frozen have run, and asserts the
exit code, the one line, and that no output changed and no temporary file was left.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml

from tests.conftest import make_repo
from tests.reliability.conftest import assert_one_line_error, run_script

OUTPUT_DIRS = ("data", "models", "metrics", "plots")


@pytest.fixture(scope="module")
def repo(tmp_path_factory, mlflow_db_template) -> Path:
    """prepare, split and train_frozen done once (1 epoch); params.yaml kept as params.base."""
    repo = make_repo(tmp_path_factory.mktemp("validation"), mlflow_db_template,
                     {"train_frozen": {"epochs": 1}})
    for stage in ("prepare", "split", "train_frozen"):
        result = run_script(f"stages/{stage}.py", cwd=repo)
        assert result.returncode == 0, (stage, result.stderr[-3000:])
    (repo / "params.base").write_text((repo / "params.yaml").read_text())
    return repo


def snapshot(repo: Path) -> dict[str, str]:
    """Every file under the output folders (hidden temporaries included), by content hash."""
    return {path.relative_to(repo).as_posix(): hashlib.md5(path.read_bytes()).hexdigest()
            for folder in OUTPUT_DIRS for path in sorted((repo / folder).rglob("*"))
            if path.is_file()}


def set_params(repo: Path, changes: dict[str, object]) -> None:
    """params.base with dotted keys replaced (``{"train.margin": 3}``)."""
    params = yaml.safe_load((repo / "params.base").read_text())
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = params
        for part in parents:
            node = node[part]
        node[last] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def run_refused(repo: Path, stage: str, *fragments: str,
                env: dict[str, str] | None = None) -> str:
    before = snapshot(repo)
    result = run_script(f"stages/{stage}.py", cwd=repo, env=env)
    line = assert_one_line_error(result, *fragments)
    assert snapshot(repo) == before, f"{stage} changed its outputs before refusing: {line}"
    return line


# (id, params changes, the stage that must refuse, fragments of the one line)
RANGES = [
    ("seed-overflows-torch", {"seed": 2**64}, "prepare", "seed", "2147483647"),
    ("seed-above-int32", {"seed": 2**31}, "prepare", "seed"),
    ("seed-negative", {"seed": -1}, "prepare", "seed"),
    ("seed-float", {"seed": 1.5}, "prepare", "seed", "integer"),
    ("lr-overflowing-int", {"lr": 10**400}, "prepare", "lr"),
    ("lr-nan", {"lr": float("nan")}, "prepare", "lr", "finite"),
    ("temperature-tiny", {"train.temperature": 1e-6}, "train_unfrozen", "train.temperature"),
    ("temperature-huge", {"train.temperature": 1e6}, "train_unfrozen", "train.temperature"),
    ("margin-beyond-unit-sphere", {"train.margin": 5.0}, "train_unfrozen", "train.margin",
     "2"),
    ("margin-zero", {"train.margin": 0.0}, "train_unfrozen", "train.margin"),
    ("embedding-dim-huge", {"model.embedding_dim": 10**9}, "prepare", "model.embedding_dim"),
    ("hidden-dim-huge", {"model.hidden_dim": 10**9}, "prepare", "model.hidden_dim"),
    ("cifar-depth-huge", {"model.cifar_n": 10**6}, "prepare", "model.cifar_n"),
    ("pairs-per-epoch-huge", {"train.pairs_per_epoch": 10**12}, "prepare",
     "train.pairs_per_epoch"),
    ("triplets-per-epoch-huge", {"train.triplets_per_epoch": 10**12}, "prepare",
     "train.triplets_per_epoch"),
    ("val-pairs-huge", {"train.val_pairs": 10**12}, "prepare", "train.val_pairs"),
    ("test-pairs-huge", {"evaluate.test_pairs": 10**12}, "prepare", "evaluate.test_pairs"),
    ("bootstrap-huge", {"evaluate.bootstrap": 10**9}, "prepare", "evaluate.bootstrap"),
    ("batch-size-huge", {"train.batch_size": 10**9}, "prepare", "train.batch_size"),
    ("epochs-zero", {"train_unfrozen.epochs": 0}, "prepare", "train_unfrozen.epochs"),
    ("mining-k-huge", {"train.mining_k": 10**9}, "prepare", "train.mining_k"),
    ("tracking-timeout-zero", {"tracking.timeout_s": 0}, "prepare", "tracking.timeout_s"),
    ("section-null", {"train": None}, "prepare", "train", "mapping"),
    ("int-as-string", {"train.batch_size": "32"}, "prepare", "train.batch_size", "integer"),
    ("bool-as-string", {"model.normalize": "yes"}, "prepare", "model.normalize"),
    ("literal-typo", {"precision": "fp16"}, "prepare", "precision", "bf16"),
]

# Batches a loss's sampler cannot form: refused by the training stage before any epoch.
FEASIBILITY = [
    ("supcon-batch-not-multiple", {"train.loss": "supcon", "train.batch_size": 10,
                                   "train.images_per_class": 4}, "train_unfrozen",
     "train.batch_size", "images_per_class"),
    ("supcon-one-class-per-batch", {"train.loss": "supcon", "train.batch_size": 4,
                                    "train.images_per_class": 4}, "train_unfrozen",
     "train.batch_size", "2 classes"),
    ("supcon-more-classes-per-batch-than-split-has",
     {"train.loss": "supcon", "train.batch_size": 32, "train.images_per_class": 2},
     "train_unfrozen", "train.batch_size", "classes"),
    ("inbatch-more-classes-per-batch-than-split-has",
     {"train.loss": "inbatch_contrastive", "train.batch_size": 64,
      "train.images_per_class": 4}, "train_unfrozen", "train.batch_size", "classes"),
    ("ntxent-odd-batch", {"train.loss": "ntxent", "train.batch_size": 15,
                          "train_unfrozen.augment.enabled": True}, "train_unfrozen",
     "train.batch_size", "even"),
    ("ntxent-without-augmentation", {"train.loss": "ntxent",
                                     "train_unfrozen.augment.enabled": False},
     "train_unfrozen", "train_unfrozen.augment.enabled"),
    ("ntxent-batch-above-train-images", {"train.loss": "ntxent", "train.batch_size": 200,
                                         "train_unfrozen.augment.enabled": True},
     "train_unfrozen", "train.batch_size", "train split"),
    ("unknown-loss", {"train.loss": "arcface"}, "train_unfrozen", "train.loss", "triplet"),
    ("unknown-backbone", {"model.backbone": "vit_h14"}, "train_frozen", "model.backbone"),
    ("unknown-unfreeze-stage", {"train_unfrozen.unfreeze_from": "layer9"}, "train_unfrozen",
     "train_unfrozen.unfreeze_from"),
    ("unknown-saliency-method", {"gradcam_segment.methods": ["gradcam", "shap"]},
     "gradcam_segment", "gradcam_segment.methods"),
    ("binarize-percent-out-of-range", {"gradcam_segment.binarize": ["top_percent:200"]},
     "gradcam_segment", "gradcam_segment.binarize"),
]


@pytest.mark.parametrize(("changes", "stage", "fragments"),
                         [pytest.param(c, s, f, id=i) for i, c, s, *f in RANGES + FEASIBILITY])
def test_a_param_the_stage_cannot_use_is_refused_before_any_work(repo, changes, stage,
                                                                 fragments):
    set_params(repo, changes)
    run_refused(repo, stage, *fragments)


# Strings that go into an MLflow search filter: the experiment name, from DVC_EXP_NAME. The
# stage finds its parent run by a filter on the group key, which holds the name: a second stage
# of the same execution must join the first one's parent, not start its own.
@pytest.mark.parametrize("name", ["it's", 'say "hi"', "back\\slash", "per%cent_under",
                                  "unicode é ü", "a` = 'x' or tags.`b"])
def test_experiment_names_with_query_characters_group_their_stages(repo, name):
    set_params(repo, {})
    for _ in range(2):
        result = run_script("stages/prepare.py", cwd=repo, env={"DVC_EXP_NAME": name})
        assert result.returncode == 0, result.stderr[-2000:]
    parents = [run for run in parent_runs(repo) if run.data.tags["dvc_experiment"] == name]
    assert len(parents) == 1, [run.info.run_name for run in parents]


def parent_runs(repo: Path) -> list:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("retrieval")
    return client.search_runs([experiment.experiment_id], max_results=1000,
                              filter_string="tags.`pipeline.parent` = 'true'")


def test_both_quote_kinds_in_the_experiment_name_are_refused_in_one_line(repo):
    set_params(repo, {})
    run_refused(repo, "prepare", "both", "dvc exp run -n",
                env={"DVC_EXP_NAME": "it's \"x\""})


@pytest.mark.parametrize(("loss", "margin", "normalize", "refused"), [
    ("contrastive", 2.0, True, False), ("contrastive", 2.5, True, True),
    ("triplet", 4.0, True, False), ("triplet", 4.5, True, True),
    ("inbatch_contrastive", 4.5, True, True), ("supcon", 50.0, True, False),
    ("contrastive", 50.0, False, False),  # raw head output: no sphere bounds the distances
])
def test_the_margin_bound_follows_the_loss_and_the_embedding_space(loss, margin, normalize,
                                                                    refused):
    from retrieval import losses
    from retrieval.config import ParamsError, TrainConfig

    cfg = TrainConfig(loss=loss, margin=margin, batch_size=16, images_per_class=4)
    if not refused:
        losses.check_params(cfg, normalize=normalize)
        return
    with pytest.raises(ParamsError, match=r"train\.margin .* must be <= [24] for train\.loss"):
        losses.check_params(cfg, normalize=normalize)


# Files an earlier stage wrote, damaged since (truncated, edited by hand, another version): the
# stage that reads one names it and the stage that re-creates it (outputs.reading).
DAMAGED = [
    ("split-csv-without-a-column", "data/split.csv", b"path,label\nx,y\n", "train_frozen",
     ("data/split.csv", "column 'split' is missing", "dvc repro --force split")),
    ("split-csv-empty", "data/split.csv", b"", "train_frozen",
     ("data/split.csv", "dvc repro --force split")),
    ("dataset-json-garbled", "data/prepared/dataset.json", b"{not json", "train_frozen",
     ("data/prepared/dataset.json", "dvc repro --force prepare")),
    ("dataset-json-a-list", "data/prepared/dataset.json", b"[]", "train_frozen",
     ("data/prepared/dataset.json", "a JSON object expected")),
    ("dataset-json-without-root", "data/prepared/dataset.json", b'{"masks": ""}',
     "train_frozen", ("data/prepared/dataset.json", "no 'root'")),
    ("index-csv-binary", "data/prepared/index.csv", b"garbage\x00\x01", "split",
     ("data/prepared/index.csv", "column 'path' is missing", "dvc repro --force prepare")),
    ("checkpoint-truncated", "models/train_frozen/best.pt", b"PK\x03\x04", "train_unfrozen",
     ("models/train_frozen/best.pt",)),
]


@pytest.mark.parametrize(("relative", "content", "stage", "fragments"),
                         [pytest.param(*case[1:], id=case[0]) for case in DAMAGED])
def test_a_damaged_output_of_an_earlier_stage_is_named_in_one_line(repo, relative, content,
                                                                   stage, fragments):
    set_params(repo, {})
    damaged = repo / relative
    original = damaged.read_bytes()
    damaged.write_bytes(content)
    try:
        run_refused(repo, stage, *fragments)
    finally:
        damaged.write_bytes(original)
