"""Detection's command line and config: the keys it shares with seg and cls (``dataset``, ``target``, ``modality``,
``data.limit``), the keys of earlier versions refused with the new key named (YAML and ``--set``) but still read from
old checkpoints, and the AdamW groups with timm's layer-wise lr decay."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from test_det_data import make_fake_idrid
from test_det_model import _tiny_args, tiny_config
from visionfm.config import CONFIG_DIR, ConfigError, ConfigMismatchError, load_yaml
from visionfm.errors import run_cli
from visionfm.tasks.detection.cli import (LEGACY_KEYS, build_parser, check_legacy_keys, config_from_args, main,
                                          upgrade_legacy_config)


def test_shared_top_level_keys_and_flags():
    cfg = config_from_args(build_parser().parse_args(["--dataset", "coco", "--target", "fovea", "--modality",
                                                      "fundus", "--limit", "3"]))
    assert (cfg["dataset"], cfg["target"], cfg["modality"], cfg["data"]["limit"]) == ("coco", "fovea", "cfp", 3)
    assert "modality" not in cfg["model"] and cfg["data"]["coco"]["val_fraction"] == 0.15
    seg, cls = (load_yaml(CONFIG_DIR / t / "default.yaml") for t in ("seg", "cls"))
    det = load_yaml(CONFIG_DIR / "det" / "default.yaml")
    for key in ("dataset", "modality"):  # the same places as in seg and cls
        assert isinstance(det[key], str) and isinstance(seg[key], str) and isinstance(cls[key], str)
    assert "limit" in det["data"] and "limit" in seg["data"] and "limit" in cls["data"]
    for recipe in ("od_target", "fovea_target", "lesions_target"):  # every shipped YAML uses the current keys
        check_legacy_keys(load_yaml(CONFIG_DIR / "det" / f"{recipe}.yaml"), where=recipe)


def test_old_keys_in_a_yaml_or_set_name_the_new_key(tmp_path: Path):
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump({"dataset": {"name": "IDRiD", "target": "fovea", "val_count": 5,
                                               "coco": {"train_ann": "a.json"}},
                                   "model": {"modality": "oct", "detector": "fcos"}}))
    args = build_parser().parse_args(["--config", str(old), "--dataset", "IDRiD"])
    with pytest.raises(ConfigError) as err:
        config_from_args(args)
    message = str(err.value)
    for before, after in (("dataset.name", "dataset"), ("dataset.target", "target"), ("model.modality", "modality"),
                          ("dataset.val_count", "data.val_count"), ("dataset.coco", "data.coco")):
        assert f"{before!r} is now {after!r}" in message, message
    assert str(old) in message
    for item, after in (("dataset.name=coco", "'dataset'"), ("model.modality=oct", "'modality'"),
                        ("dataset.coco.train_ann=x.json", "'data.coco.train_ann'")):
        with pytest.raises(ConfigError, match=f"--set '{item.split('=')[0]}' is now {after}"):
            config_from_args(build_parser().parse_args(["--set", item]))
    assert set(LEGACY_KEYS.values()) <= {"dataset", "target", "modality"} | {f"data.{k}" for k in
                                                                              load_yaml(CONFIG_DIR / "det" /
                                                                                        "default.yaml")["data"]}
    # through the command's error boundary: one line, non-zero status, nothing written
    out = tmp_path / "run"
    assert run_cli(main, ["--config", str(old), "--output", str(out)]) != 0 and not out.exists()


def test_earlier_checkpoints_are_upgraded_and_earlier_run_folders_refused(tmp_path: Path):
    earlier = {"dataset": {"name": "IDRiD", "target": "od", "val_count": 10}, "data": {"max_size": 64},
               "model": {"modality": "cfp", "detector": "retinanet"}}
    cfg = upgrade_legacy_config(earlier)
    assert cfg["dataset"] == "IDRiD" and cfg["target"] == "od" and cfg["modality"] == "cfp"
    assert cfg["data"] == {"val_count": 10, "max_size": 64} and cfg["model"] == {"detector": "retinanet"}
    assert upgrade_legacy_config(cfg) == cfg and earlier["model"]["modality"] == "cfp"  # the input is kept
    out = tmp_path / "old_run"
    out.mkdir()
    (out / "config.yaml").write_text(yaml.safe_dump(earlier))
    with pytest.raises(ConfigMismatchError, match="earlier version"):
        main(["--data-root", str(tmp_path), "--output", str(out), "--random-init"])
    assert yaml.safe_load((out / "config.yaml").read_text()) == earlier  # left as it was


def test_predict_reads_a_checkpoint_with_the_earlier_keys(tmp_path: Path):
    """A best.pth of an earlier version (config with dataset.name / model.modality) still predicts."""
    from PIL import Image

    from visionfm.engine.checkpoint import atomic_save
    from visionfm.tasks.detection.runner import build_detector

    cfg = tiny_config()
    model, _, _ = build_detector(cfg, ("optic_disc",), img_size=64)
    earlier = {k: v for k, v in cfg.items() if k not in ("dataset", "target", "modality", "data")}
    earlier["dataset"] = {"name": "IDRiD", "target": "od"}
    earlier["model"] = {**cfg["model"], "modality": "cfp"}
    earlier["data"] = {k: v for k, v in cfg["data"].items() if k not in ("limit", "coco", "source")}
    atomic_save({"model": model.state_dict(), "step": 1, "val": {}, "classes": ["optic_disc"], "config": earlier},
                tmp_path / "best.pth")
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (96, 64), (90, 40, 20)).save(images / "a.png")
    assert run_cli(main, ["predict", "--checkpoint", str(tmp_path / "best.pth"), "--images", str(images),
                          "--output", str(tmp_path / "pred")]) == 0
    listing = json.loads((tmp_path / "pred" / "boxes.json").read_text())
    assert [im["name"] for im in listing["images"]] == ["a"] and listing["images"][0]["boxes"]  # top box kept (od)


def _old_groups(model, lr, mult, wd):
    """The rule before layer decay existed (visionfm.tasks.detection.runner._param_groups at e121a4f)."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            no_decay = p.ndim <= 1 or name.endswith((".pos_embed", ".cls_token"))
            out[name] = (lr * (mult if name.startswith("backbone.") else 1.0), 0.0 if no_decay else wd)
    return out


def _groups_by_name(model, groups):
    ids = {id(p): n for n, p in model.named_parameters()}
    return {ids[id(p)]: (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}


def test_layer_decay_groups_through_timm():
    from visionfm.tasks.detection.runner import build_detector, param_groups

    model, _, _ = build_detector(tiny_config(), ("disc",), img_size=64)
    depth = len(model.backbone.encoder.blocks)
    lr, mult, wd = 2e-4, 0.5, 0.05
    # decay 1: exactly the floats of the earlier single backbone rate
    assert _groups_by_name(model, param_groups(model, lr, mult, wd, 1.0)) == _old_groups(model, lr, mult, wd)
    got = _groups_by_name(model, param_groups(model, lr, mult, wd, 0.5))
    assert set(got) == {n for n, p in model.named_parameters() if p.requires_grad}
    enc = "backbone.encoder."
    assert got[enc + f"blocks.{depth - 1}.mlp.fc1.weight"] == pytest.approx((lr * mult * 0.5, wd))
    assert got[enc + "blocks.0.attn.qkv.weight"] == pytest.approx((lr * mult * 0.5 ** depth, wd))
    assert got[enc + "blocks.0.attn.qkv.bias"] == pytest.approx((lr * mult * 0.5 ** depth, 0.0))
    assert got[enc + "patch_embed.proj.weight"] == pytest.approx((lr * mult * 0.5 ** (depth + 1), wd))
    assert got[enc + "pos_embed"][1] == 0.0 and got[enc + "cls_token"][1] == 0.0
    heads = [n for n in got if not n.startswith("backbone.")]
    assert heads and all(got[n][0] == lr for n in heads)  # the pyramid and the heads at the full rate
    model.backbone.encoder.requires_grad_(False)  # a frozen encoder is left out
    assert all(not n.startswith(enc) for n in _groups_by_name(model, param_groups(model, lr, mult, wd, 0.5)))


def test_layer_decay_trains_and_is_checked(tmp_path: Path):
    root = make_fake_idrid(tmp_path / "data")
    common = ["--data-root", str(root), "--max-steps", "1", "--set", "data.val_count=2", *_tiny_args(),
              "--set", "eval.pngs=0"]
    with pytest.raises(ConfigError, match=r"optim.layer_decay must be in \(0, 1\]"):
        main([*common, "--output", str(tmp_path / "bad"), "--set", "optim.layer_decay=1.5"])
    out = tmp_path / "decayed"
    assert main([*common, "--output", str(out), "--set", "optim.layer_decay=0.75"]) == 0
    state = torch.load(out / "last.pth", weights_only=True)
    lrs = sorted({round(g["lr_scale"], 9) for g in state["optimizer"]["param_groups"]})
    assert lrs[-1] == 1.0 and len(lrs) > 10 and lrs[0] == pytest.approx(0.5 * 0.75 ** 13)  # vit_tiny: 12 blocks
