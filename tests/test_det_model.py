"""The real mmdet detectors on our encoder: registration, the simple pyramid, loss/backward/predict for RetinaNet,
FCOS and Faster R-CNN on tiny images, mmdet's COCO metric on hand-made cases, predictions mapped back to the
original resolution, and ``downstream/det.py`` end to end on a miniature IDRiD and a COCO json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from mmengine.dataset import pseudo_collate
from PIL import Image
from safetensors.torch import load_file

from test_det_data import make_fake_idrid
from visionfm.config import ConfigMismatchError, apply_overrides, load_yaml
from visionfm.models.vit import create_encoder
from visionfm.tasks.detection import models  # noqa: F401 - registers the components
from visionfm.data.boxes import DetectionRecord
from visionfm.tasks.detection.dataset import DetectionDataset, StepBatchSampler
from visionfm.tasks.detection.evaluation import Prediction, coco_metrics, predict
from visionfm.tasks.detection.models import SimpleFeaturePyramid
from visionfm.tasks.detection.cli import main
from visionfm.tasks.detection.runner import DEFAULT_CONFIG, build_detector
from visionfm.weights.export import save_encoder

# Narrow heads so that a step takes well under a second on a busy CPU.
TINY_MMDET = {
    "retinanet": {"model.neck.out_channels": 32, "model.bbox_head.in_channels": 32,
                  "model.bbox_head.feat_channels": 32, "model.bbox_head.stacked_convs": 1},
    "fcos": {"model.neck.out_channels": 32, "model.bbox_head.in_channels": 32, "model.bbox_head.feat_channels": 32,
             "model.bbox_head.stacked_convs": 1},
    "faster_rcnn": {"model.neck.out_channels": 32, "model.rpn_head.in_channels": 32,
                    "model.rpn_head.feat_channels": 32, "model.roi_head.bbox_roi_extractor.out_channels": 32,
                    "model.roi_head.bbox_head.in_channels": 32, "model.roi_head.bbox_head.fc_out_channels": 64},
}


def tiny_config(detector: str = "retinanet", **overrides) -> dict:
    cfg = load_yaml(DEFAULT_CONFIG)
    base = {"model.detector": detector, "model.random_init": True, "model.arch": "vit_tiny", "data.max_size": 64,
            "model.drop_path_rate": 0.0}
    base.update(overrides)
    cfg = apply_overrides(cfg, [f"{k}={v}" for k, v in base.items()])
    cfg["model"]["mmdet"] = dict(TINY_MMDET[detector])
    return cfg


def _records(tmp_path: Path, sizes=((80, 60), (60, 80))) -> list:
    rng = np.random.default_rng(0)
    out = []
    for i, (w, h) in enumerate(sizes):
        image = rng.integers(0, 80, (h, w, 3)).astype(np.uint8)
        image[10:40, 20:50] = 240
        path = tmp_path / f"img{i}.png"
        Image.fromarray(image).save(path)
        out.append(DetectionRecord(f"img{i}", path, w, h, [[20, 10, 50, 40]], [0], point=(35.0, 25.0),
                                   disc_diameter=30.0))
    return out


# ------------------------------------------------------------------------------------------- components
def test_components_are_registered():
    from mmdet.registry import MODELS

    from visionfm.models.mm_backbone import VisionFMViT

    assert MODELS.get("VisionFMViT") is VisionFMViT
    assert MODELS.get("SimpleFeaturePyramid") is SimpleFeaturePyramid


def test_simple_pyramid_strides_and_inputs():
    neck = SimpleFeaturePyramid(192, out_channels=16, scale_factors=(4.0, 2.0, 1.0, 0.5), num_outs=5)
    outs = neck([torch.randn(2, 192, 6, 8)])
    assert [tuple(o.shape) for o in outs] == [(2, 16, 24, 32), (2, 16, 12, 16), (2, 16, 6, 8), (2, 16, 3, 4),
                                              (2, 16, 2, 2)]
    multi = SimpleFeaturePyramid([192] * 3, out_channels=8, scale_factors=(2.0, 1.0, 0.5), use_all_inputs=True)
    maps = [torch.randn(1, 192, 4, 4) for _ in range(3)]
    assert [o.shape[-1] for o in multi(maps)] == [8, 4, 2]
    # level i really comes from map i: changing only the last map leaves the finest level unchanged
    changed = multi(maps[:2] + [torch.randn(1, 192, 4, 4)])
    assert torch.equal(changed[0], multi(maps)[0]) and not torch.equal(changed[2], multi(maps)[2])
    with pytest.raises(ValueError, match="has 3 levels but got 2"):
        multi(maps[:2])
    with pytest.raises(ValueError, match="scale factors must be among"):
        SimpleFeaturePyramid(192, scale_factors=(3.0,))
    with pytest.raises(ValueError, match="finest first"):
        SimpleFeaturePyramid(192, scale_factors=(0.5, 1.0))


def test_simple_pyramid_image_stem_feeds_the_fine_levels():
    torch.manual_seed(0)
    neck = SimpleFeaturePyramid(192, out_channels=16, scale_factors=(4.0, 2.0, 1.0, 0.5), stem_channels=8)
    image, tokens = torch.randn(1, 3, 64, 96), torch.randn(1, 192, 4, 6)
    outs = neck([image, tokens])
    assert [tuple(o.shape[-2:]) for o in outs] == [(16, 24), (8, 12), (4, 6), (2, 3)]
    # a change inside one 16-px patch reaches the stride-4 and stride-8 levels only through the image path
    moved = image.clone()
    moved[..., 20:24, 36:40] += 3.0
    changed = neck([moved, tokens])
    assert not torch.equal(changed[0], outs[0]) and not torch.equal(changed[1], outs[1])
    assert torch.equal(changed[2], outs[2]) and torch.equal(changed[3], outs[3])
    assert len(neck.stem) == 3 and neck.stem_levels == [True, True, False, False]
    with pytest.raises(ValueError, match="needs the image first"):
        neck([tokens])
    with pytest.raises(ValueError, match="multiple of 8 pixels|no image-path map"):
        neck([torch.randn(1, 3, 72, 96), tokens])


def test_detector_with_image_stem_trains(tmp_path: Path):
    cfg = tiny_config()
    cfg["model"]["mmdet"]["model.neck.stem_channels"] = 8
    detector, _, _ = build_detector(cfg, ("disc",), img_size=64)
    assert detector.backbone.with_input and detector.neck.stem_channels == 8
    dataset = DetectionDataset(_records(tmp_path), ("disc",), max_size=64, train=True)
    data = detector.data_preprocessor(pseudo_collate([dataset[0], dataset[1]]), training=True)
    loss, _ = detector.parse_losses(detector(**data, mode="loss"))
    loss.backward()
    assert torch.isfinite(loss) and detector.neck.stem[0][0].weight.grad.abs().sum() > 0


def test_detector_keeps_pretrained_encoder_weights(tmp_path: Path):
    encoder = create_encoder("vit_tiny", 16, 64)
    weights = tmp_path / "cfp_vit_tiny.safetensors"
    save_encoder(encoder.state_dict(), weights, {"modality": "cfp", "arch": "vit_tiny", "img_size": 64})
    cfg = tiny_config(**{"model.random_init": False})
    cfg["model"]["weights"] = str(weights)
    detector, info, _ = build_detector(cfg, ("disc",), img_size=64)
    assert info.source == str(weights)
    stored = load_file(str(weights))
    loaded = detector.backbone.encoder.state_dict()
    for key in ("blocks.0.attn.qkv.weight", "patch_embed.proj.weight", "blocks.11.mlp.fc2.weight"):
        assert torch.equal(loaded[key], stored[key]), key  # init_weights() must not re-initialise the encoder
    assert detector.backbone.out_indices == (11,)
    assert detector.data_preprocessor.mean.flatten().tolist() == pytest.approx([255 * v for v in info.mean])
    baseline, base_info, _ = build_detector(tiny_config(), ("disc",), img_size=64)
    assert not base_info.pretrained
    assert not torch.equal(baseline.backbone.encoder.state_dict()["blocks.0.attn.qkv.weight"],
                           stored["blocks.0.attn.qkv.weight"])


@pytest.mark.parametrize("detector_name", ["retinanet", "fcos", "faster_rcnn"])
def test_detector_trains_and_predicts(tmp_path: Path, detector_name: str):
    torch.manual_seed(0)
    detector, _, _ = build_detector(tiny_config(detector_name), ("disc",), img_size=64)
    dataset = DetectionDataset(_records(tmp_path), ("disc",), max_size=64, train=True)
    data = detector.data_preprocessor(pseudo_collate([dataset[0], dataset[1]]), training=True)
    losses = detector(**data, mode="loss")
    loss, _ = detector.parse_losses(losses)
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    grad = detector.backbone.encoder.blocks[-1].mlp.fc2.weight.grad
    assert grad is not None and grad.abs().sum() > 0  # the encoder is trained through the pyramid
    preds = predict(detector, DetectionDataset(_records(tmp_path), ("disc",), max_size=64), batch_size=2)
    assert len(preds) == 2
    for pred, (w, h) in zip(preds, ((80, 60), (60, 80))):
        assert pred["bboxes"].shape[1] == 4 and len(pred["bboxes"]) == len(pred["scores"]) == len(pred["labels"])
        if len(pred["bboxes"]):
            assert pred["bboxes"][:, 2].max() <= w + 1e-3 and pred["bboxes"][:, 3].max() <= h + 1e-3


def test_predictions_are_at_the_original_resolution(tmp_path: Path):
    """A 256x192 image is seen at 64x48; the (untrained) detector's boxes spread over the whole image, so they
    must reach beyond the resized 64x48 frame once mapped back, and never beyond the original."""
    torch.manual_seed(0)
    detector, _, _ = build_detector(tiny_config(), ("disc",), img_size=64)
    dataset = DetectionDataset(_records(tmp_path, sizes=((256, 192),)), ("disc",), max_size=64)
    (pred,) = predict(detector, dataset)
    assert len(pred["bboxes"]) > 10
    assert pred["bboxes"][:, 2].max() > 100 and pred["bboxes"][:, 3].max() > 80
    assert pred["bboxes"][:, 2].max() <= 256 + 1e-3 and pred["bboxes"][:, 3].max() <= 192 + 1e-3


def test_dataset_scales_and_flips_boxes(tmp_path: Path):
    (rec,) = _records(tmp_path, sizes=((80, 60),))
    sample = DetectionDataset([rec], ("disc",), max_size=40, train=False)[0]
    ds = sample["data_samples"]
    assert tuple(sample["inputs"].shape) == (3, 30, 40)
    assert ds.scale_factor == (0.5, 0.5) and ds.ori_shape == (60, 80) and ds.img_shape == (30, 40)
    assert ds.gt_instances.bboxes.tolist() == [[10, 5, 25, 20]]
    assert ds.instances[0]["bbox"] == [20, 10, 50, 40]  # the original boxes travel along for the COCO metric
    flipped = DetectionDataset([rec], ("disc",), max_size=40, train=True, hflip=1.0)[0]
    assert flipped["data_samples"].gt_instances.bboxes.tolist() == [[15, 5, 30, 20]]
    assert torch.equal(flipped["inputs"], sample["inputs"].flip(-1))


def test_dataset_training_crops_contain_a_box_and_keep_the_frame(tmp_path: Path):
    (rec,) = _records(tmp_path, sizes=((80, 60),))
    rec = DetectionRecord(rec.name, rec.image, 80, 60, [[20, 10, 50, 40], [70, 50, 74, 54]], [0, 1])
    whole = DetectionDataset([rec], ("disc", "spot"), max_size=80, train=False, crop_size=32)[0]
    assert tuple(whole["inputs"].shape) == (3, 60, 80)  # evaluation images stay whole
    ds = DetectionDataset([rec], ("disc", "spot"), max_size=80, train=True, hflip=0.0, crop_size=32, crop_on_box=1.0)
    seen = set()
    for seed in range(40):
        sample = ds[(0, seed)]
        meta = sample["data_samples"]
        assert tuple(sample["inputs"].shape) == (3, 32, 32) and meta.img_shape == (32, 32)
        boxes, labels = meta.gt_instances.bboxes, meta.gt_instances.labels
        assert len(boxes) >= 1 and (boxes >= 0).all() and (boxes <= 32).all()  # a box-centred crop holds a box
        seen.update(labels.tolist())
        # the crop is the image's pixels at the window the boxes were shifted by
        full = whole["inputs"]
        x0, y0 = next((x, y) for y in range(29) for x in range(49) if torch.equal(full[:, y:y + 32, x:x + 32],
                                                                                  sample["inputs"]))
        truth = torch.tensor(rec.boxes) - torch.tensor([x0, y0, x0, y0])
        assert any(torch.allclose(b, t.clamp(0, 32)) for b in boxes for t in truth)
    assert seen == {0, 1}  # both boxes get drawn as the crop's anchor
    assert torch.equal(ds[(0, 7)]["inputs"], ds[(0, 7)]["inputs"])  # a function of the seed
    with pytest.raises(ValueError, match="crop_size must be at least 32"):
        DetectionDataset([rec], ("disc", "spot"), crop_size=8)


# ----------------------------------------------------------------------------------------------- metric
def _prediction(boxes, scores, labels=None) -> Prediction:
    return Prediction(bboxes=np.array(boxes, np.float32).reshape(-1, 4), scores=np.array(scores, np.float32),
                      labels=np.array(labels if labels is not None else [0] * len(scores), np.int64))


def test_coco_metric_hand_made(tmp_path: Path):
    dataset = DetectionDataset(_records(tmp_path), ("disc",), max_size=64)  # truth: [20, 10, 50, 40] in both
    perfect = [_prediction([[20, 10, 50, 40]], [0.9]), _prediction([[20, 10, 50, 40]], [0.8])]
    m = coco_metrics(dataset, perfect)
    assert m["map"] == pytest.approx(1.0) and m["ap50"] == pytest.approx(1.0) and m["ap75"] == pytest.approx(1.0)
    # IoU of a 30x30 box shifted by 8 px: 22*30 / (2*900 - 660) = 0.579 -> a hit at 0.5, a miss at 0.75
    shifted = [_prediction([[28, 10, 58, 40]], [0.9]), _prediction([[28, 10, 58, 40]], [0.8])]
    m = coco_metrics(dataset, shifted)
    assert m["ap50"] == pytest.approx(1.0) and m["ap75"] == pytest.approx(0.0)
    assert m["map"] == pytest.approx(0.2, abs=1e-3)  # hit at IoU 0.50 and 0.55 only: 2 of 10 thresholds
    # one image found, one missed with a false positive ranked first: precision 1/2 up to recall 1/2, then
    # nothing; COCO averages 101 recall points, 51 of them at or below 1/2 -> 0.5 * 51 / 101
    mixed = [_prediction([[20, 10, 50, 40]], [0.5]), _prediction([[0, 50, 10, 60]], [0.9])]
    assert coco_metrics(dataset, mixed)["ap50"] == pytest.approx(0.5 * 51 / 101, abs=1e-3)
    assert coco_metrics(dataset, shifted, classwise=True)["ap_disc"] == pytest.approx(0.2, abs=1e-3)
    # two classes: "disc" found exactly in both images, "cup" predicted on the wrong spot -> AP 1 and 0
    two = DetectionDataset([DetectionRecord(r.name, r.image, r.width, r.height, [[20, 10, 50, 40], [0, 0, 10, 10]],
                                            [0, 1]) for r in dataset.records], ("disc", "cup"), max_size=64)
    preds = [_prediction([[20, 10, 50, 40], [40, 40, 50, 50]], [0.9, 0.9], [0, 1]) for _ in range(2)]
    m = coco_metrics(two, preds, classwise=True)
    assert m["ap_disc"] == pytest.approx(1.0) and m["ap_cup"] == pytest.approx(0.0)
    assert m["map"] == pytest.approx(0.5)
    empty = [_prediction([], []), _prediction([], [])]
    assert coco_metrics(dataset, empty) == {k: 0.0 for k in ("map", "ap50", "ap75", "map_s", "map_m", "map_l")}
    with pytest.raises(ValueError, match="1 predictions for 2 images"):
        coco_metrics(dataset, perfect[:1])


# ------------------------------------------------------------------------------------------ end to end
def _tiny_args(detector: str = "retinanet") -> list:
    mmdet = "{" + ", ".join(f"{k}: {v}" for k, v in TINY_MMDET[detector].items()) + "}"
    return ["--random-init", "--set", "data.max_size=64", "--set", f"model.mmdet={mmdet}",
            "--set", "optim.batch_size=2", "--set", "eval.pngs=2", "--set", "model.drop_path_rate=0.0"]


def test_cli_idrid_od_end_to_end(tmp_path: Path):
    root = make_fake_idrid(tmp_path / "data")
    out = tmp_path / "run"
    assert main(["--dataset", "IDRiD", "--target", "od", "--data-root", str(root), "--output", str(out),
                 "--max-steps", "2", "--set", "data.val_count=2", "--set", "train.eval_every=1",
                 *_tiny_args()]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("map", "ap50", "ap75", "mean_distance_px", "within_1_8_dd"):
        assert key in metrics
    assert 0.0 <= metrics["ap50"] <= 1.0 and metrics["n_images"] == 3
    assert metrics["images"] == {"train": 4, "val": 2, "test": 3} and metrics["steps"] == 2
    assert metrics["best_step"] in (1, 2) and metrics["encoder"]["pretrained"] is False
    ckpt = torch.load(out / "best.pth", map_location="cpu", weights_only=True)
    assert ckpt["step"] == metrics["best_step"] and ckpt["classes"] == ["optic_disc"]
    assert any(k.startswith("backbone.encoder.blocks.") for k in ckpt["model"])
    assert sorted(p.name for p in (out / "predictions").glob("*.png")) == ["IDRiD_07.png", "IDRiD_08.png"]
    assert Image.open(out / "predictions" / "IDRiD_07.png").size == (64, 43)
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert (out / "config.yaml").is_file() and (out / "mmdet_config.py").is_file()


def test_cli_stopped_run_resumes_to_the_uninterrupted_result(tmp_path: Path):
    # 5 steps over 4 training images at batch 2 cross two epoch boundaries; the stopped run (--max-steps 3 keeps
    # the 5-step schedule) resumes from last.pth and must end with the uninterrupted run's weights. Drop-path on,
    # so the global RNG must be restored too.
    root = make_fake_idrid(tmp_path / "data")
    common = ["--dataset", "IDRiD", "--target", "od", "--data-root", str(root), "--set", "data.val_count=2",
              "--set", "train.eval_every=3", "--set", "optim.steps=5", "--set", "data.hflip=0.5",
              "--set", "data.color_jitter=0.2", *_tiny_args(), "--set", "model.drop_path_rate=0.2"]
    assert main([*common, "--output", str(tmp_path / "whole")]) == 0
    assert main([*common, "--output", str(tmp_path / "parts"), "--max-steps", "3"]) == 0
    assert torch.load(tmp_path / "parts" / "last.pth", weights_only=True)["step"] == 3
    assert main([*common, "--output", str(tmp_path / "parts")]) == 0
    whole = torch.load(tmp_path / "whole" / "last.pth", weights_only=True)
    parts = torch.load(tmp_path / "parts" / "last.pth", weights_only=True)
    assert whole["step"] == parts["step"] == 5
    for key, value in whole["model"].items():
        assert torch.equal(value, parts["model"][key]), key
    m_whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    m_parts = json.loads((tmp_path / "parts" / "metrics.json").read_text())
    assert m_parts["best_step"] == m_whole["best_step"] and m_parts["map"] == m_whole["map"]
    with pytest.raises(ConfigMismatchError, match=r"optim.lr = 0.01"):
        main([*common, "--output", str(tmp_path / "parts"), "--set", "optim.lr=0.01"])
    with pytest.raises(ConfigMismatchError, match=r"data.limit = 3"):
        main([*common, "--output", str(tmp_path / "parts"), "--limit", "3"])


def test_step_batch_sampler_is_a_function_of_the_step():
    full = list(StepBatchSampler(5, 2, seed=3, start=0, stop=7))
    assert list(StepBatchSampler(5, 2, seed=3, start=4, stop=7)) == full[4:]
    for epoch in range(3):  # two batches an epoch (drop-last), no image twice within one
        indices = [i for batch in full[2 * epoch:2 * epoch + 2] for i, _ in batch]
        assert len(set(indices)) == 4
    assert [i for i, _ in full[0]] != [i for i, _ in full[2]] or [i for i, _ in full[1]] != [i for i, _ in full[3]]
    assert len({seed for batch in full for _, seed in batch}) == 14  # every draw its own augmentation seed
    with pytest.raises(ValueError, match="batch size 6"):
        StepBatchSampler(5, 6, seed=0, start=0, stop=1)


def test_cli_fovea_and_lesions(tmp_path: Path):
    root = make_fake_idrid(tmp_path / "data")
    out = tmp_path / "fovea"
    main(["--target", "fovea", "--data-root", str(root), "--output", str(out), "--max-steps", "1",
          "--set", "data.loc_test_count=4", "--set", "data.loc_val_count=2", "--set", "eval.select=within_1_8_dd",
          *_tiny_args("fcos"), "--detector", "fcos"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == {"train": 6, "val": 2, "test": 4} and metrics["classes"] == ["fovea"]
    assert 0.0 <= metrics["within_1_8_dd"] <= 1.0 and metrics["n_images"] == 4
    out = tmp_path / "lesions"
    main(["--target", "lesions", "--data-root", str(root), "--output", str(out), "--max-steps", "1", "--limit", "2",
          "--set", "data.val_count=2", "--set", "data.lesion_merge_gap=3", "--set", "data.lesion_min_size=2",
          "--set", "data.crop_size=32", *_tiny_args()])
    metrics = json.loads((out / "metrics.json").read_text())
    assert "ap_haemorrhage" in metrics and "within_1_8_dd" not in metrics and metrics["images"]["test"] == 2
    assert metrics["ap_soft_exudate"] is None  # no soft exudate anywhere: COCO's NaN is written as null


def test_cli_coco_end_to_end(tmp_path: Path):
    records = _records(tmp_path, sizes=[(80, 60)] * 8)
    data = {"images": [{"id": i, "file_name": r.image.name} for i, r in enumerate(records)],
            "annotations": [{"id": i, "image_id": i, "category_id": 1, "bbox": [20, 10, 30, 30]}
                            for i in range(len(records))],
            "categories": [{"id": 1, "name": "blob"}]}
    (tmp_path / "train.json").write_text(json.dumps(data))
    out = tmp_path / "run"
    main(["--dataset", "coco", "--data-root", str(tmp_path), "--output", str(out), "--max-steps", "1",
          "--set", "data.coco.train_ann=train.json", "--set", f"data.coco.train_images={tmp_path}",
          "--set", "data.coco.val_fraction=0.25", "--set", "data.coco.test_fraction=0.25",
          *_tiny_args("faster_rcnn"), "--detector", "faster_rcnn"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == {"train": 4, "val": 2, "test": 2} and metrics["classes"] == ["blob"]
    assert "map" in metrics and metrics["target"] is None


def test_cli_errors(tmp_path: Path):
    from visionfm.config import ConfigError

    with pytest.raises(ConfigError, match="data.coco.train_ann"):
        main(["--dataset", "coco", "--data-root", str(tmp_path), "--output", str(tmp_path / "o"), "--random-init"])
    with pytest.raises(ConfigError, match="detector 'yolo'"):
        build_detector(tiny_config() | {"model": {**tiny_config()["model"], "detector": "yolo"}}, ("a",), 64)
    with pytest.raises(ConfigError, match="does not work with two-stage detectors"):
        main(["--data-root", str(make_fake_idrid(tmp_path / "d2")), "--output", str(tmp_path / "o3"),
              "--detector", "faster_rcnn", "--set", "train.precision=bf16", "--set", "data.val_count=2",
              *_tiny_args("faster_rcnn")])
    with pytest.raises(ConfigError, match="within_1_8_dd needs a point target"):
        main(["--target", "lesions", "--data-root", str(make_fake_idrid(tmp_path / "d")), "--random-init",
              "--output", str(tmp_path / "o2"), "--set", "eval.select=within_1_8_dd", "--set", "data.val_count=2"])
