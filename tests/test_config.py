"""params.yaml validation: typos, types and ranges are rejected by name, in one line."""

from pathlib import Path

import pytest
import yaml

from retrieval import config, losses
from retrieval.config import Params, ParamsError, load_params, params_from_dict
from retrieval.outputs import UserError
from tests.conftest import TINY_PARAMS, merge

REPO_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def test_repo_params_yaml_loads_every_value_as_written():
    params = load_params(REPO_PARAMS)
    loaded = config.flatten(config.to_dict(params))
    written = config.flatten(yaml.safe_load(REPO_PARAMS.read_text()))
    assert set(written) <= set(loaded)
    for key, value in written.items():
        if isinstance(loaded[key], float):
            value = float(value)  # ints and YAML 1.1's "1e-3" strings become floats
        elif isinstance(loaded[key], tuple):
            value = tuple(value)
        assert loaded[key] == value, key
        assert type(loaded[key]) is type(value), key
    assert isinstance(params.lr, float) and params.lr > 0
    assert params.split.train + params.split.val + params.split.test == pytest.approx(1)


def test_missing_keys_take_the_defaults():
    assert params_from_dict({}) == Params()
    assert params_from_dict(None) == Params()  # an empty params.yaml


@pytest.mark.parametrize(("raw", "message"), [
    ({"data": {"imag_size": 96}}, "unknown key 'data.imag_size'"),
    ({"sead": 1}, "unknown key 'sead'"),
    ({"data": "big"}, "data must be a mapping"),
    ({"seed": 1.5}, "seed must be an integer, found 1.5"),
    ({"seed": True}, "seed must be an integer, found True"),
    ({"data": {"image_size": "96"}}, "data.image_size must be an integer"),
    ({"lr": "fast"}, "lr must be a float, found 'fast'"),
    ({"lr": True}, "lr must be a float"),
    ({"model": {"batchnorm": "yes"}}, "model.batchnorm must be true or false"),
    ({"data": {"root": 7}}, "data.root must be a str"),
    ({"gradcam_segment": {"methods": "gradcam"}}, "gradcam_segment.methods must be a list"),
    ({"lr": 0}, "lr (0.0) must be in (0, 10): change lr in params.yaml"),
    ({"lr": -0.1}, "lr (-0.1) must be in (0, 10)"),
    # 0.7 + 0.2 + 0.2 = 1.1 (printed with :g)
    ({"split": {"train": 0.7, "val": 0.2, "test": 0.2}}, "split.train/val/test sum to 1.1"),
    ({"split": {"train": 0.8, "val": 0.0, "test": 0.2}}, "split.val (0.0) must be in (0, 1)"),
    ({"split": {"mode": "random"}}, "split.mode is 'random'"),
    ({"data": {"image_size": 8}}, "data.image_size (8) must be in [16, 1024]"),
    ({"data": {"source": "folder"}}, "data.root is empty but data.source is 'folder'"),
    ({"data": {"synthetic": {"classes": 1}}}, "data.synthetic.classes (1) must be in [2, 16]"),
    ({"device": "gpu"}, "device ('gpu') must be auto, cpu or cuda[:N]"),
])
def test_bad_params_are_rejected_by_name_in_one_line(raw, message):
    with pytest.raises(ParamsError) as error:
        params_from_dict(raw)
    assert message in str(error.value)
    assert "\n" not in str(error.value)
    assert isinstance(error.value, UserError)


def checked_train_params(raw: dict) -> Params:
    """What a training stage does first: params.yaml's checks, then the loss registry's."""
    params = params_from_dict(raw)
    losses.check_params(params.train)
    return params


@pytest.mark.parametrize(("raw", "message"), [
    ({"train": {"loss": "supcon", "batch_size": 30}},
     "train.batch_size (30) must be a multiple of images_per_class (4)"),
    # Every loss on class-balanced batches, the classifier baseline too (losses.LOSSES).
    ({"train": {"loss": "cross_entropy", "batch_size": 30}},
     "train.batch_size (30) must be a multiple of images_per_class (4)"),
    ({"train": {"loss": "arcface"}}, "train.loss is 'arcface', expected one of ['contrastive', "
                                     "'inbatch_contrastive', 'triplet', 'supcon', "
                                     "'cross_entropy', 'ntxent']: change train.loss in "
                                     "params.yaml"),
])
def test_bad_loss_params_are_rejected_by_name_in_one_line(raw, message):
    with pytest.raises(ParamsError) as error:
        checked_train_params(raw)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_the_loss_choices_are_the_registry(monkeypatch):
    assert checked_train_params({"train": {"loss": "supcon"}}).train.loss == "supcon"
    registry = dict(losses.LOSSES)  # a copy: the registry's order is tested elsewhere
    monkeypatch.setattr(losses, "LOSSES", registry)
    registry["new_loss"] = registry["triplet"]
    assert checked_train_params({"train": {"loss": "new_loss"}}).train.loss == "new_loss"
    del registry["supcon"]
    with pytest.raises(ParamsError, match="train.loss is 'supcon'"):
        checked_train_params({"train": {"loss": "supcon"}})


def test_merge_overrides_nested_keys_and_rejects_unknown_ones():
    base = {"a": 1, "b": {"c": 2, "d": 3}}
    assert merge(base, {"b": {"c": 5}}) == {"a": 1, "b": {"c": 5, "d": 3}}
    assert base == {"a": 1, "b": {"c": 2, "d": 3}}  # not modified
    with pytest.raises(KeyError, match="'b.cc'"):
        merge(base, {"b": {"cc": 5}})
    with pytest.raises(KeyError, match="'e'"):
        merge(base, {"e": 1})


def test_the_tiny_test_params_name_only_real_keys():
    # The end-to-end tests' overrides (tests/conftest.py): a typo there would fail here, fast.
    params_from_dict(merge(yaml.safe_load(REPO_PARAMS.read_text()), TINY_PARAMS))


def test_float_strings_coerce_to_float():
    # YAML 1.1 reads 1e-3 (no dot) as the string "1e-3"; float fields accept it.
    params = params_from_dict({"lr": "1e-3", "train": {"weight_decay": "1e-4", "margin": 2}})
    assert params.lr == 0.001 and isinstance(params.lr, float)
    assert params.train.weight_decay == 0.0001
    assert params.train.margin == 2.0 and isinstance(params.train.margin, float)


def test_load_params_reads_yaml_1e_notation(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("lr: 1e-3\nsplit:\n  train: 0.8\n  val: 0.1\n  test: 0.1\n")
    assert yaml.safe_load(path.read_text())["lr"] == "1e-3"  # the string, as promised above
    params = load_params(path)
    assert params.lr == 0.001 and params.split.train == 0.8


def test_load_params_file_problems(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("data: [unclosed\n")
    with pytest.raises(ParamsError, match="broken.yaml is not valid YAML") as error:
        load_params(broken)
    assert "\n" not in str(error.value)
