"""Using the toolkit on one's own images: embed, attention maps, classifier predict / --eval-only, zero-shot on a
folder, ONNX export, and the bad inputs each must refuse by name. Real images (written on the fly or from the
shared data), real encoders (the shipped cfp one, or a tiny one saved in our format), no mocks."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.models.vision_transformer import VisionTransformer

from visionfm.errors import run_cli
from visionfm.weights.export import save_encoder


def _rows(path: Path) -> list:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture
def fundus_folder(tmp_path: Path) -> Path:
    """Three fundus-like pictures of different sizes and kinds: colour PNG, 16-bit grey TIFF, wide JPEG."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "fundus"
    folder.mkdir()
    yy, xx = np.mgrid[0:120, 0:160]
    disc = ((yy - 60) ** 2 + (xx - 50) ** 2 < 200).astype(np.float64)
    base = np.stack([150 + 80 * disc, 60 + 40 * disc, 20 + 10 * disc], -1) + rng.normal(0, 8, (120, 160, 3))
    Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(folder / "a_colour.png")
    Image.fromarray((np.clip(base[..., 0], 0, 255) * 257).astype(np.uint16)).save(folder / "b_grey16.tif")
    Image.fromarray(np.clip(base[:, ::-1] * 0.8, 0, 255).astype(np.uint8)).resize((240, 96)).save(folder / "c_wide.jpg")
    return folder


@pytest.fixture(scope="module")
def tiny_oct_weights(tmp_path_factory) -> Path:
    """A 48-wide, 2-block ViT for 32-pixel OCT images, saved in our weights format."""
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=16, embed_dim=48, depth=2, num_heads=2, num_classes=0,
                            dynamic_img_size=True)
    path = tmp_path_factory.mktemp("weights") / "oct_tiny.safetensors"
    save_encoder(vit.state_dict(), path, {"modality": "oct", "num_heads": 2, "img_size": 32,
                                          "mean": [0.2, 0.2, 0.2], "std": [0.2, 0.2, 0.2]})
    return path


# ------------------------------------------------------------------------------------------------ embed
def test_embed_features_index_scatter_and_labels(fundus_folder, tmp_path, capsys):
    from visionfm.inference.embed import pooled_tokens
    from visionfm.inference.embed_cli import main
    from visionfm.weights.loader import load_encoder

    table = tmp_path / "list.csv"
    table.write_text("path,label\nfundus/a_colour.png,healthy\nfundus/b_grey16.tif,healthy\nfundus/c_wide.jpg,dr\n")
    out = tmp_path / "emb"
    assert run_cli(main, ["--images", str(table), "--pool", "cls+mean", "--output", str(out), "--batch-size", "2",
                          "--device", "cpu"]) == 0, capsys.readouterr().err
    features = np.load(out / "embeddings.npy")
    encoder, info = load_encoder("cfp")
    assert features.shape == (3, 2 * info.embed_dim) and np.isfinite(features).all()
    index = _rows(out / "index.csv")
    assert [r["row"] for r in index] == ["0", "1", "2"]
    assert [r["label"] for r in index] == ["healthy", "healthy", "dr"]
    assert Path(index[1]["path"]).name == "b_grey16.tif"
    with Image.open(out / "embeddings_pca.png") as png:
        assert png.format == "PNG"
    assert not list(out.glob(".partial-*"))
    # Row 0 is the encoder's output for that image, read as the encoder's training images are.
    from visionfm.data.encoder_inputs import encoder_batch, prepare_inputs

    images = prepare_inputs(table, "cfp", info.patch_size)
    with torch.no_grad():
        expected = pooled_tokens(encoder.eval(), encoder_batch(images[:1], "cfp", info.img_size, info.mean, info.std),
                                 "cls+mean").numpy()
    np.testing.assert_allclose(features[0], expected[0], rtol=1e-4, atol=1e-5)
    assert not np.allclose(features[0], features[2])


def test_embed_safetensors_format(fundus_folder, tmp_path, capsys):
    from safetensors import safe_open

    from visionfm.inference.embed_cli import main

    out = tmp_path / "emb"
    assert run_cli(main, ["--images", str(fundus_folder), "--format", "safetensors", "--output", str(out),
                          "--device", "cpu"]) == 0, capsys.readouterr().err
    with safe_open(str(out / "embeddings.safetensors"), "np") as handle:
        assert handle.get_tensor("embeddings").shape[0] == 3
        names = json.loads(handle.metadata()["names"])
    assert names == ["a_colour", "b_grey16", "c_wide"]


def test_corrupt_file_is_named_and_nothing_earlier_is_overwritten(fundus_folder, tmp_path, capsys, caplog):
    from visionfm.inference.embed_cli import main

    out = tmp_path / "emb"
    assert run_cli(main, ["--images", str(fundus_folder), "--output", str(out), "--device", "cpu"]) == 0
    before = (out / "embeddings.npy").read_bytes()
    good = (fundus_folder / "a_colour.png").read_bytes()
    (fundus_folder / "broken.png").write_bytes(good[: len(good) // 3])
    (fundus_folder / "notes.txt").write_text("not an image")
    capsys.readouterr()
    assert run_cli(main, ["--images", str(fundus_folder), "--output", str(out), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "broken.png" in err and err.count("\n") == 1, err
    assert (out / "embeddings.npy").read_bytes() == before  # the earlier result is untouched
    assert run_cli(main, ["--images", str(fundus_folder), "--output", str(out), "--skip-corrupt",
                          "--device", "cpu"]) == 0
    assert np.load(out / "embeddings.npy").shape[0] == 3
    assert "skipped 2 unreadable file(s)" in caplog.text


def test_empty_folder_small_image_and_wrong_weights_are_clear_errors(tmp_path, capsys):
    from visionfm.inference.embed_cli import main

    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_cli(main, ["--images", str(empty), "--output", str(tmp_path / "o")]) == 1
    assert "is empty" in capsys.readouterr().err
    small = tmp_path / "small"
    small.mkdir()
    Image.fromarray(np.full((10, 40, 3), 90, np.uint8)).save(small / "tiny.png")
    assert run_cli(main, ["--images", str(small), "--output", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "tiny.png" in err and "smaller than one 16-pixel patch" in err
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(small / "tiny.png")
    bogus = tmp_path / "model.safetensors"
    bogus.write_bytes(b"not a safetensors file")
    assert run_cli(main, ["--images", str(small), "--weights", str(bogus), "--output", str(tmp_path / "o")]) == 1
    assert "model.safetensors" in capsys.readouterr().err
    assert not (tmp_path / "o" / "embeddings.npy").exists()


def test_grey_image_for_colour_modality_is_noted(fundus_folder, caplog):
    from visionfm.data.encoder_inputs import prepare_inputs

    with caplog.at_level("WARNING"):
        images = prepare_inputs(fundus_folder, "cfp", 16)
    assert [im.channels for im in images] == [3, 1, 3]
    assert "1 of 3 image(s) are grey but the cfp modality reads colour" in caplog.text
    with caplog.at_level("WARNING"):
        prepare_inputs(fundus_folder, "oct", 16)
    assert "2 of 3 image(s) are colour but the oct modality reads grey" in caplog.text


# ------------------------------------------------------------------------------------------------ attention
def test_attention_maps_match_the_encoder_and_overlays_keep_the_resolution(fundus_folder, tmp_path, capsys):
    from visionfm.inference.attention import last_block_attention
    from visionfm.inference.attention_cli import main
    from visionfm.weights.loader import load_encoder

    encoder, info = load_encoder("cfp")
    encoder.eval()
    x = torch.randn(2, 3, 64, 96)
    attention, patches = last_block_attention(encoder, x)
    heads = encoder.blocks[-1].attn.num_heads
    assert attention.shape == (2, heads, 4 * 6) and patches.shape == (2, 24, info.embed_dim)
    with torch.no_grad():
        np.testing.assert_allclose(patches.numpy(), encoder.forward_features(x)[:, 1:].numpy(), atol=1e-5)
    total = attention.sum(-1)  # the class token's attention to itself is the rest of 1
    assert bool(((total > 0) & (total < 1 + 1e-6)).all())

    out = tmp_path / "att"
    assert run_cli(main, ["--images", str(fundus_folder), "--limit", "1", "--output", str(out), "--device",
                          "cpu"]) == 0, capsys.readouterr().err
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == sorted([f"a_colour_head{k}.png" for k in range(heads)] + ["a_colour_attn_mean.png",
                                                                            "a_colour_pca.png", "a_colour_panel.png"])
    with Image.open(out / "a_colour_head0.png") as png:
        assert png.size == (160, 120)
    with Image.open(out / "a_colour_pca.png") as png:
        assert png.size == (160, 120)


# ------------------------------------------------------------------------------------------------ classification
def _predict_first_test_images(checkpoint, test_rows, tmp_path, capsys, n: int = 3):
    """``downstream/cls.py predict`` on the first ``n`` images of a run's predictions_test.csv; its rows."""
    from visionfm.tasks.classification.cli import main

    listing = tmp_path / "test.csv"
    with open(listing, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        writer.writerows([[r["path"], r["target"]] for r in test_rows[:n]])
    pred = tmp_path / "pred"
    assert run_cli(main, ["predict", "--checkpoint", str(checkpoint), "--images", str(listing),
                          "--output", str(pred), "--device", "cpu"]) == 0, capsys.readouterr().err
    return _rows(pred / "predictions.csv")


@pytest.mark.parametrize("mirror", [False, True])
def test_cls_predict_and_eval_only_reproduce_the_training_run(shared_data, tiny_oct_weights, tmp_path, capsys,
                                                              mirror):
    """``model.pt`` gives the run's test probabilities again; with ``eval.mirror`` (the mean of each image's and
    its mirror's logits) too, as the file records it."""
    from visionfm.tasks.classification.cli import main
    from visionfm.tasks.classification.predict import load_classifier

    run = tmp_path / "cls"
    args = ["--dataset", "OCT_DME", "--modality", "oct", "--mode", "finetune", "--data-root", str(shared_data),
            "--weights", str(tiny_oct_weights), "--limit", "8", "--max-steps", "2", "--precision", "fp32",
            "--set", "eval.bootstrap=0", "--set", "output.plots=false", "--device", "cpu",
            "--set", f"eval.mirror={str(mirror).lower()}"]
    assert run_cli(main, args + ["--output", str(run)]) == 0, capsys.readouterr().err
    assert (run / "model.pt").is_file()
    test_rows = _rows(run / "predictions_test.csv")
    rows = _predict_first_test_images(run / "model.pt", test_rows, tmp_path, capsys)
    assert len(rows) == 3
    classes = [c[2:] for c in rows[0] if c.startswith("p_")]
    for row, ref in zip(rows, test_rows):
        probs = [float(row[f"p_{c}"]) for c in classes]
        assert probs == pytest.approx([float(ref[f"p_{c}"]) for c in classes], abs=1e-4)
        assert row["prediction"] == classes[int(np.argmax(probs))]

    model = load_classifier(run / "model.pt", "cpu").model
    assert model.mirror_eval is mirror and not model.training
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        both = model(images)
        model.mirror_eval = False
        one, mirrored = model(images), model(images.flip(-1))
    assert torch.allclose(both, (one + mirrored) / 2 if mirror else one, atol=1e-5)

    again = tmp_path / "eval"
    assert run_cli(main, args + ["--eval-only", "--checkpoint", str(run / "model.pt"), "--output", str(again)]) == 0
    trained, evaluated = (json.loads((d / "metrics.json").read_text())["test"] for d in (run, again))
    assert evaluated["accuracy"] == pytest.approx(trained["accuracy"])
    assert evaluated["confusion_matrix"] == trained["confusion_matrix"]


def test_probe_with_mirror_eval_predicts_as_it_was_tested(shared_data, tiny_oct_weights, tmp_path, capsys):
    """``eval.mirror``: validation and test use the mean of each image's and its mirror's features; the
    saved head.pt records it, so ``predict`` gives the run's test probabilities (and not those of one view)."""
    from visionfm.tasks.classification.cli import main
    from visionfm.tasks.classification.predict import load_classifier

    run = tmp_path / "probe"
    args = ["--dataset", "OCT_DME", "--modality", "oct", "--mode", "linear", "--data-root", str(shared_data),
            "--weights", str(tiny_oct_weights), "--limit", "8", "--precision", "fp32", "--set", "linear.epochs=3",
            "--set", "eval.mirror=true", "--set", "eval.bootstrap=0", "--set", "output.plots=false",
            "--device", "cpu", "--output", str(run)]
    assert run_cli(main, args) == 0, capsys.readouterr().err
    test_rows = _rows(run / "predictions_test.csv")
    classes = [c[2:] for c in test_rows[0] if c.startswith("p_")]
    for row, ref in zip(_predict_first_test_images(run / "head.pt", test_rows, tmp_path, capsys), test_rows):
        assert [float(row[f"p_{c}"]) for c in classes] == pytest.approx([float(ref[f"p_{c}"]) for c in classes],
                                                                         abs=1e-4)
    classifier = load_classifier(run / "head.pt", "cpu")
    assert classifier.model.mirror_eval
    images = torch.randn(2, 3, classifier.img_size, classifier.img_size)
    with torch.no_grad():
        both = classifier.model(images)
        classifier.model.mirror_eval = False
        one = classifier.model(images)
        mirrored = classifier.model(images.flip(-1))
    assert not torch.allclose(both, one, atol=1e-4)  # the mirror matters for this encoder
    assert torch.allclose(both, (one + mirrored) / 2, atol=1e-5)  # a linear head: the mean of the two views' logits


def test_predict_refuses_a_checkpoint_of_another_task(tmp_path, fundus_folder, capsys):
    from visionfm.engine.checkpoint import atomic_save
    from visionfm.inference.checkpoints import checkpoint_kind
    from visionfm.tasks.classification.cli import main as cls_main
    from visionfm.tasks.detection.cli import main as det_main

    seg = {"format": "visionfm-seg-1", "model": {"backbone.x": torch.zeros(1), "decode_head.y": torch.zeros(1)}}
    det = {"model": {"backbone.x": torch.zeros(1), "bbox_head.y": torch.zeros(1)}, "classes": ["od"], "config": {}}
    cls = {"model": {"encoder.x": torch.zeros(1)}, "class_names": ["a", "b"], "kind": "multiclass"}
    assert [checkpoint_kind(c) for c in (seg, det, cls, {"a": 1})] == ["segmentation", "detection",
                                                                       "classification", "unknown"]
    atomic_save(seg, tmp_path / "seg.pth")
    atomic_save(cls, tmp_path / "cls.pt")
    assert run_cli(cls_main, ["predict", "--checkpoint", str(tmp_path / "seg.pth"), "--images", str(fundus_folder),
                              "--output", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "seg.pth: a segmentation checkpoint" in err and "downstream/seg.py" in err
    assert run_cli(det_main, ["predict", "--checkpoint", str(tmp_path / "cls.pt"), "--images", str(fundus_folder),
                              "--output", str(tmp_path / "o")]) == 1
    assert "cls.pt: a classification checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


# ------------------------------------------------------------------------------------------------ zero-shot
def test_zeroshot_on_a_folder_with_free_prompts(fundus_folder, tmp_path, capsys, caplog):
    caplog.set_level("INFO", logger="visionfm.clip")
    from visionfm.tasks.zeroshot.cli import zeroshot_main

    out = tmp_path / "zs"
    classes = ["no diabetic retinopathy", "a retina with lots of tiny yellow dots"]
    assert run_cli(zeroshot_main, ["--modality", "cfp", "--images", str(fundus_folder), "--classes", *classes,
                                   "--output", str(out), "--device", "cpu"]) == 0, capsys.readouterr().err
    assert "knowledge-base category 'no_diabetic_retinopathy'" in caplog.text
    assert "not a knowledge-base category" in caplog.text
    rows = _rows(out / "predictions.csv")
    assert len(rows) == 3
    for row in rows:
        probs = [float(row[f"p_{c}"]) for c in classes]
        assert sum(probs) == pytest.approx(1.0, abs=1e-4)
        assert row["prediction"] == classes[int(np.argmax(probs))]


# ------------------------------------------------------------------------------------------------ ONNX
def test_onnx_export_matches_pytorch_with_a_dynamic_batch(tmp_path, shared_data, capsys):
    ort = pytest.importorskip("onnxruntime", reason="the onnx extra (pip install -e .[onnx]) is not installed")
    from visionfm.weights.cli import main
    from visionfm.weights.loader import load_encoder

    drive = shared_data / "DRIVE" / "test" / "images"
    path = tmp_path / "cfp.onnx"
    assert run_cli(main, ["export-onnx", "cfp", "--output", str(path), "--img-size", "64", "--check-images",
                          str(drive)]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "4 image(s) of" in printed and "largest absolute difference" in printed
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    got = session.run(None, {"images": x.numpy()})[0]
    encoder, _ = load_encoder("cfp", img_size=64)
    with torch.no_grad():
        want = encoder.eval()(x).numpy()
    assert got.shape == want.shape == (5, encoder.embed_dim)
    assert float(np.abs(got - want).max()) < 1e-4


# ------------------------------------------------------------------------------------------------ detection
def test_det_predict_writes_boxes_at_full_resolution_and_pictures(shared_data, fundus_folder, tmp_path, capsys,
                                                                   caplog):
    from visionfm.tasks.detection.cli import main

    run = tmp_path / "det"
    assert run_cli(main, ["--dataset", "IDRiD", "--target", "od", "--max-steps", "1", "--limit", "2", "--data-root",
                          str(shared_data), "--device", "cpu", "--set", "data.max_size=128", "--set", "eval.pngs=0",
                          "--output", str(run)]) == 0, capsys.readouterr().err
    out = tmp_path / "pred"
    caplog.set_level("INFO")
    # Given the run's resumable training state, predict uses the trained model of the same run (and says so).
    assert run_cli(main, ["predict", "--checkpoint", str(run / "last.pth"), "--images", str(fundus_folder),
                          "--output", str(out), "--device", "cpu"]) == 0, capsys.readouterr().err
    assert "using the run's trained model" in caplog.text
    rows = _rows(out / "boxes.csv")
    listing = json.loads((out / "boxes.json").read_text())
    assert [im["name"] for im in listing["images"]] == ["a_colour", "b_grey16", "c_wide"]
    assert len(rows) == sum(len(im["boxes"]) for im in listing["images"]) >= 3  # the optic disc: top box always kept
    sizes = {im["name"]: (im["width"], im["height"]) for im in listing["images"]}
    assert sizes["c_wide"] == (240, 96)
    for row in rows:
        width, height = sizes[row["name"]]
        x1, y1, x2, y2 = (float(row[k]) for k in ("x1", "y1", "x2", "y2"))
        assert 0 <= x1 <= x2 <= width + 1e-3 and 0 <= y1 <= y2 <= height + 1e-3, row
        assert row["class"] == "optic_disc"
    for name in sizes:
        with Image.open(out / f"{name}.png") as png:
            assert png.format == "PNG"
