"""params.yaml validation: typos, types and ranges are rejected by name, in one line."""

from pathlib import Path

import pytest
import yaml

from retrieval.config import Params, ParamsError, load_params, params_from_dict
from retrieval.outputs import UserError

REPO_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def test_repo_params_yaml_loads():
    params = load_params(REPO_PARAMS)
    assert params == params_from_dict(yaml.safe_load(REPO_PARAMS.read_text()))
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
    ({"train": {"loss": "supcon", "batch_size": 30}},
     "train.batch_size (30) must be a multiple of images_per_class (4)"),
    ({"device": "gpu"}, "device ('gpu') must be auto, cpu or cuda[:N]"),
])
def test_bad_params_are_rejected_by_name_in_one_line(raw, message):
    with pytest.raises(ParamsError) as error:
        params_from_dict(raw)
    assert message in str(error.value)
    assert "\n" not in str(error.value)
    assert isinstance(error.value, UserError)


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
