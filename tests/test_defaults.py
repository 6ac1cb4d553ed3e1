"""params.yaml is the single source of defaults: the config dataclasses' defaults equal it.

So deleting a line from params.yaml cannot silently change a run, and a test that builds a config
with defaults builds the configuration the pipeline runs.
"""

from pathlib import Path

import yaml

from retrieval import config

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def test_dataclass_defaults_equal_params_yaml_key_for_key():
    defaults = config.flatten(config.to_dict(config.Params()))
    defaults = {k: list(v) if isinstance(v, tuple) else v for k, v in defaults.items()}
    in_yaml = config.flatten(yaml.safe_load(PARAMS.read_text()))
    assert sorted(defaults) == sorted(in_yaml), "params.yaml and the dataclasses differ in keys"
    differing = {k: (defaults[k], in_yaml[k]) for k in defaults if defaults[k] != in_yaml[k]}
    assert not differing, f"dataclass default != params.yaml: {differing}"
