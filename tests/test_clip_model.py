"""CLIPModel, the text encoder, the knowledge file and prompt ensembling, on tiny random models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from timm.models.vision_transformer import VisionTransformer

from visionfm.models.clip import CLIPModel, EncoderMismatchError, prepare_images
from visionfm.models.text import TextEncoder, mean_pool, tiny_text_encoder
from visionfm.data.knowledge import KnowledgeBase, KnowledgeError, fill_template
from visionfm.weights import load_encoder, save_encoder


# ------------------------------------------------------------------------------------------------ helpers
def make_encoder_file(path: Path, modality: str = "oct", img_size: int = 32, seed: int = 0) -> Path:
    """A tiny random ViT (32 wide, 2 blocks) saved in our weights format."""
    torch.manual_seed(seed)
    enc = VisionTransformer(img_size=img_size, patch_size=16, num_classes=0, embed_dim=32, depth=2, num_heads=2,
                            dynamic_img_size=True)
    save_encoder(enc.state_dict(), path, {"format": "visionfm-encoder/1", "modality": modality, "patch_size": 16,
                                          "img_size": img_size, "num_heads": 2, "mean": [0.3, 0.3, 0.3],
                                          "std": [0.2, 0.2, 0.2], "data": "random (test)"})
    return path


def make_clip(tmp_path: Path, text: TextEncoder, modality: str = "oct", img_size: int = 32, **kwargs) -> CLIPModel:
    encoder, info = load_encoder(modality, weights=make_encoder_file(tmp_path / f"{modality}_tiny.safetensors",
                                                                     modality, img_size))
    torch.manual_seed(1)
    return CLIPModel(encoder, info, text, embed_dim=kwargs.pop("embed_dim", 16), **kwargs)


@pytest.fixture(scope="module")
def text() -> TextEncoder:
    return tiny_text_encoder()


@pytest.fixture
def model(tmp_path, text) -> CLIPModel:
    return make_clip(tmp_path, text, "oct")


def _grey_images(n: int, size=(40, 56), seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 1, *size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


# ------------------------------------------------------------------------------------------------ text encoder
def test_mean_pooling_ignores_padding(text):
    alone = text.encode(["microaneurysms"])
    padded = text.encode(["microaneurysms", "a much longer caption about hard exudates near the fovea"])
    assert torch.allclose(alone[0], padded[0], atol=1e-5)
    hidden = torch.tensor([[[1.0], [3.0], [100.0]]])
    assert mean_pool(hidden, torch.tensor([[1, 1, 0]])).item() == pytest.approx(2.0)


def test_text_encoder_freeze_and_tune_last_layers(text):
    text.set_trainable(full=False, last_layers=1)
    trainable = {n for n, p in text.model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("encoder.layer.1.") for n in trainable)
    assert set(text.trainable_state_dict()) == {f"model.{n}" for n in trainable}
    text.set_trainable(full=False, last_layers=0)
    assert text.frozen
    text.train()
    assert not text.model.training  # a frozen encoder stays in eval mode (deterministic features)
    with pytest.raises(ValueError, match="between 0 and 2"):
        text.set_trainable(last_layers=3)
    with pytest.raises(ValueError, match="non-empty"):
        text.encode(["ok", "  "])


def test_text_encoder_loads_from_a_local_folder(tmp_path, text):
    folder = tmp_path / "tiny_text"
    text.model.save_pretrained(folder)
    text.tokenizer.save_pretrained(folder)
    loaded = TextEncoder.from_pretrained(folder, freeze=True)
    assert loaded.identity["name"] == str(folder.resolve())
    assert torch.allclose(loaded.encode(["drusen"]), text.encode(["drusen"]), atol=1e-5)
    from visionfm.models.text import TextEncoderNotFoundError

    with pytest.raises(TextEncoderNotFoundError, match="no installed package"):
        TextEncoder.from_pretrained(tmp_path / "does_not_exist")


# ------------------------------------------------------------------------------------------------ knowledge
def test_knowledge_file_names_templates_and_prompts():
    kb = KnowledgeBase.load()
    for key in ("diabetic_macular_edema", "no_diabetic_macular_edema", "hard_exudates", "haemorrhages",
                "microaneurysms", "drusen", "glaucoma", "myopia", "normal", "proliferative_diabetic_retinopathy",
                "mild_npdr", "moderate_npdr", "severe_npdr"):
        assert key in kb.categories, key
    assert kb.resolve("No macular oedema").key == "no_diabetic_macular_edema"
    assert kb.resolve("hemorrhages").key == "haemorrhages"
    assert kb.templates_for("cfp")[0] == "A fundus photograph of [CLS]."
    prompts = kb.class_prompts("diabetic macular edema", "oct")
    cat = kb.categories["diabetic_macular_edema"]
    assert len(prompts) == len(kb.templates_for("oct")) * len(cat.phrases("oct"))
    assert "An OCT B-scan of diabetic macular edema." in prompts
    assert any("cystoid" in p for p in prompts) and not any("hard exudates clustered" in p for p in prompts)
    assert kb.class_prompts("retinal tear", "oct") == [fill_template(t, "retinal tear") for t in kb.templates_for("oct")]
    with pytest.raises(KnowledgeError, match="known categories"):
        kb.resolve("retinal tear")


def test_captions_use_names_and_descriptions():
    import random

    kb = KnowledgeBase.load()
    captions = {kb.caption(["hard_exudates"], "cfp", random.Random(s), 0.5) for s in range(60)}
    allowed = set(kb.all_captions(["hard_exudates"], "cfp"))
    assert captions <= allowed
    assert any("waxy" in c or "deposits" in c for c in captions) and any(c.endswith("exudates.") for c in captions)
    names_only = {kb.caption(["hard_exudates"], "cfp", random.Random(s), 0.0) for s in range(30)}
    assert not any("waxy" in c for c in names_only)


def test_bad_knowledge_files_are_rejected(tmp_path):
    bad = tmp_path / "k.yaml"
    bad.write_text("templates:\n  default: ['no slot here']\ncategories:\n  x:\n    names: [x]\n")
    with pytest.raises(KnowledgeError, match=r"k\.yaml.*no \[CLS\] slot"):
        KnowledgeBase.load(bad)
    bad.write_text("templates:\n  default: ['[CLS]']\ncategories:\n  a:\n    names: [same]\n  b:\n    names: [Same]\n")
    with pytest.raises(KnowledgeError, match="belongs to both"):
        KnowledgeBase.load(bad)


# ------------------------------------------------------------------------------------------------ prompt ensembling
def test_class_prototypes_average_normalised_prompt_embeddings(model):
    classes = [["an OCT of a dry macula", "a normal foveal pit"], ["macular cysts", "subretinal fluid", "swelling"]]
    protos = model.class_prototypes(classes)
    with torch.no_grad():
        expected = []
        for prompts in classes:
            e = F.normalize(model.text_proj(model.text_encoder.encode(prompts)), dim=-1)
            expected.append(F.normalize(e.mean(0), dim=-1))
    assert torch.allclose(protos, torch.stack(expected), atol=1e-5)
    assert torch.allclose(protos.norm(dim=-1), torch.ones(2), atol=1e-5)
    # A class name is expanded with the modality's templates and the knowledge file.
    expanded = model.class_prompts(["no macular edema", "diabetic macular edema"])
    assert expanded[1] == KnowledgeBase.load().class_prompts("diabetic macular edema", "oct")
    assert model.class_prompts(["a", "b"], expand=False) == [["a"], ["b"]]


# ------------------------------------------------------------------------------------------------ zero-shot API
def test_zero_shot_outputs_batching_and_input_forms(model):
    images = _grey_images(5)
    probs, logits = model.zero_shot(images, ["no macular edema", "diabetic macular edema"], batch_size=2)
    assert probs.shape == logits.shape == (5, 2) and probs.device.type == "cpu"
    assert torch.allclose(probs.sum(1), torch.ones(5), atol=1e-5)
    assert torch.allclose(probs, logits.softmax(-1))
    probs_one_batch, _ = model.zero_shot(images, ["no macular edema", "diabetic macular edema"], batch_size=64)
    assert torch.allclose(probs, probs_one_batch, atol=1e-5)
    # PIL images (grey, or RGB converted to grey for OCT), float tensors in [0, 1] and numpy arrays agree.
    pil = [Image.fromarray(img[0].numpy(), mode="L") for img in images]
    assert torch.allclose(model.zero_shot(pil, ["no macular edema", "diabetic macular edema"])[0], probs, atol=1e-4)
    floats = images.float() / 255
    assert torch.allclose(model.zero_shot(floats, ["no macular edema", "diabetic macular edema"])[0], probs, atol=1e-4)
    arrays = [img[0].numpy() for img in images]
    assert torch.allclose(model.zero_shot(arrays, ["no macular edema", "diabetic macular edema"])[0], probs, atol=1e-4)
    rgb = Image.fromarray(np.repeat(images[0, 0].numpy()[:, :, None], 3, axis=2), mode="RGB")
    assert torch.allclose(model.zero_shot(rgb, ["no macular edema", "diabetic macular edema"])[0], probs[:1], atol=1e-3)


def test_zero_shot_keeps_the_callers_train_eval_state(model):
    model.train()
    model.text_encoder.model.eval()  # a caller's mixed state must come back exactly
    before = {name: m.training for name, m in model.named_modules()}
    model.zero_shot(_grey_images(2), ["no macular edema", "diabetic macular edema"])
    assert {name: m.training for name, m in model.named_modules()} == before
    model.eval()
    model.zero_shot(_grey_images(2), ["no macular edema", "diabetic macular edema"])
    assert not any(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_zero_shot_rejects_bad_class_lists(model):
    images = _grey_images(2)
    with pytest.raises(ValueError, match="class_texts is empty"):
        model.zero_shot(images, [])
    with pytest.raises(ValueError, match="at least two classes"):
        model.zero_shot(images, ["diabetic macular edema"])
    with pytest.raises(ValueError, match="not one string"):
        model.zero_shot(images, "diabetic macular edema")
    with pytest.raises(ValueError, match="empty string"):
        model.zero_shot(images, ["normal", " "])
    with pytest.raises(ValueError, match="same prompts"):
        model.zero_shot(images, ["DME", "DME"])


def test_zero_shot_rejects_wrong_image_modes(tmp_path, text, model):
    classes = ["no macular edema", "diabetic macular edema"]
    cfp = make_clip(tmp_path, text, "cfp")
    rgba = Image.new("RGBA", (40, 40))
    with pytest.raises(ValueError, match=r"image 0: PIL mode 'RGBA' is not supported.*convert\('RGB'\)"):
        cfp.zero_shot(rgba, classes)
    with pytest.raises(ValueError, match=r"image 1: PIL mode 'CMYK'"):
        cfp.zero_shot([Image.new("RGB", (40, 40)), Image.new("CMYK", (40, 40))], classes)
    with pytest.raises(ValueError, match="grey PIL image .* cfp encoder"):
        cfp.zero_shot(Image.new("L", (40, 40)), classes)
    with pytest.raises(ValueError, match="1-channel .* cfp encoder"):
        cfp.zero_shot(_grey_images(2), classes)
    with pytest.raises(ValueError, match="4 channels.*alpha"):
        model.zero_shot(torch.zeros(1, 4, 32, 32, dtype=torch.uint8), classes)
    with pytest.raises(ValueError, match=r"values in \[0, 1\]"):
        model.zero_shot(torch.randn(1, 1, 32, 32) * 3, classes)
    with pytest.raises(ValueError, match="unsupported dtype"):
        model.zero_shot(torch.zeros(1, 1, 32, 32, dtype=torch.int32), classes)
    with pytest.raises(ValueError, match="no images"):
        model.zero_shot([], classes)
    with pytest.raises(TypeError, match="str"):
        model.zero_shot(["not_an_image.png"], classes)


def test_prepare_images_squares_like_the_training_pipeline():
    from visionfm.data.unlabeled import square_and_resize

    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)
    x = prepare_images(Image.fromarray(arr), "cfp", 30, (0.0,) * 3, (1.0,) * 3)
    ref = square_and_resize(arr, 30, "center").astype(np.float32) / 255  # central square for fundus
    assert x.shape == (1, 3, 30, 30)
    assert np.abs(x[0].permute(1, 2, 0).numpy() - ref).mean() < 0.03


def test_multi_block_features(tmp_path, text):
    one = make_clip(tmp_path, text, "oct")
    two = make_clip(tmp_path, text, "oct", image_pool="token+avg", image_blocks=2)
    x = one.preprocess(_grey_images(3))
    with torch.no_grad():
        f1, f2 = one.image_features(x), two.image_features(x)
        tokens = two.image_encoder.forward_features(x)
    assert f2.shape == (3, 4 * 32) and two.image_proj.shift.numel() == 4 * 32
    assert torch.allclose(f2[:, 64:96], f1, atol=1e-5)  # last block's CLS = the encoder's output
    assert torch.allclose(f2[:, 96:], tokens[:, 1:].mean(1), atol=1e-5)
    with pytest.raises(ValueError, match="between 1 and the encoder's depth 2"):
        make_clip(tmp_path, text, "oct", image_blocks=3)


def test_logit_scale_is_clamped(model):
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert model.logit_scale_value.item() == pytest.approx(100.0)
    model.clamp_logit_scale_()
    assert model.logit_scale.item() == pytest.approx(np.log(100.0))


# ------------------------------------------------------------------------------------------------ save / load
def test_save_and_load_round_trip_and_encoder_checks(tmp_path, text, model):
    folder = tmp_path / "tiny_text"
    text.model.save_pretrained(folder)
    text.tokenizer.save_pretrained(folder)
    text.identity = {"name": str(folder), "version": None}
    encoder_file = Path(model.image_info.source)
    from visionfm.weights import sha256_file

    meta = model.export_metadata(encoder_file.name, sha256_file(encoder_file), False, False, data="test")
    path = tmp_path / "oct_clip.safetensors"
    model.save(path, meta)
    loaded = CLIPModel.load(weights=path)
    assert not loaded.training and loaded.modality.name == "oct"
    images, classes = _grey_images(3), ["no macular edema", "diabetic macular edema"]
    assert torch.allclose(loaded.zero_shot(images, classes)[1], model.zero_shot(images, classes)[1], atol=1e-4)
    loaded_by_modality = CLIPModel.load("oct", weights_dir=tmp_path)
    assert loaded_by_modality.metadata["data"] == "test"
    # The image encoder changed after training: refuse (unless asked), naming both files.
    make_encoder_file(encoder_file, "oct", 32, seed=5)
    with pytest.raises(EncoderMismatchError, match="retrain"):
        CLIPModel.load(weights=path)
    CLIPModel.load(weights=path, allow_encoder_mismatch=True)
    with pytest.raises(ValueError, match="not CLIP weights"):
        CLIPModel.load(weights=encoder_file)
    with pytest.raises(ValueError, match="for oct, but modality 'cfp'"):
        CLIPModel.load("cfp", weights=path)
    from visionfm.weights import WeightsNotFoundError

    with pytest.raises(WeightsNotFoundError, match="pretrain/clip.py --modality cfp"):
        CLIPModel.load("cfp", weights_dir=tmp_path)


def test_tuned_encoders_travel_inside_the_weights(tmp_path, text, model):
    folder = tmp_path / "tiny_text"
    text.model.save_pretrained(folder)
    text.tokenizer.save_pretrained(folder)
    text.identity = {"name": str(folder), "version": None}
    text.set_trainable(last_layers=1)
    with torch.no_grad():
        model.image_encoder.blocks[1].mlp.fc1.weight.add_(0.5)  # "tuned"
        text.model.encoder.layer[1].output.dense.weight.add_(0.5)
    meta = model.export_metadata("gone.safetensors", None, True, True)
    path = tmp_path / "tuned_clip.safetensors"
    model.save(path, meta, include_image_encoder=True, include_text_encoder=True)
    text.set_trainable(last_layers=0)
    loaded = CLIPModel.load(weights=path)
    images, classes = _grey_images(2), ["normal", "drusen"]
    assert torch.allclose(loaded.zero_shot(images, classes)[1], model.zero_shot(images, classes)[1], atol=1e-4)
