import pytest

from visionfm.config import ConfigError, apply_overrides, build_config, load_yaml, merge, save_config


def test_merge_is_recursive_and_does_not_mutate():
    base = {"a": {"b": 1, "c": 2}, "d": 3}
    out = merge(base, {"a": {"c": 5}})
    assert out == {"a": {"b": 1, "c": 5}, "d": 3}
    assert base["a"]["c"] == 2


def test_overrides_parse_yaml_values_and_reject_unknown_keys():
    cfg = {"optim": {"lr": 0.1, "betas": [0.9, 0.99]}, "flag": False}
    apply_overrides(cfg, ["optim.lr=1e-3", "optim.betas=[0.5, 0.6]", "flag=true"])
    assert cfg == {"optim": {"lr": 1e-3, "betas": [0.5, 0.6]}, "flag": True}
    with pytest.raises(ConfigError, match="optim.lrr"):
        apply_overrides(cfg, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides(cfg, ["optim.lr"])


def test_override_text_with_a_colon_stays_text_and_braces_make_a_mapping():
    cfg = {"export": {"data_description": None}, "data": {"clahe": None}}
    apply_overrides(cfg, ["export.data_description=836 images: TVHL:oct,OCT_DME:train",
                          "data.clahe={clip_limit: 3.0, grid: 4}"])
    assert cfg["export"]["data_description"] == "836 images: TVHL:oct,OCT_DME:train"
    assert cfg["data"]["clahe"] == {"clip_limit": 3.0, "grid": 4}


def test_layering_order_default_experiment_flags_overrides(tmp_path):
    default = tmp_path / "default.yaml"
    default.write_text("a: 1\nb: 1\nc: 1\nd: 1\n")
    experiment = tmp_path / "exp.yaml"
    experiment.write_text("b: 2\nc: 2\nd: 2\n")
    cfg = build_config(default, experiment, {"c": 3, "d": 3, "a": None}, ["d=4"])
    assert cfg == {"a": 1, "b": 2, "c": 3, "d": 4}
    save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_yaml(tmp_path / "run" / "config.yaml") == cfg


def test_bad_yaml_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_yaml(bad)
