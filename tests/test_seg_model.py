"""The real mmseg model: our backbone, neck and heads registered and built through mmseg's registry, trained a
few steps on tiny crops, sliding-window inference, layer-wise lr decay, normalisation from the weights."""

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

import visionfm.tasks.segmentation  # noqa: F401  (registers the modules)
from visionfm.config import CONFIG_DIR, build_config
from visionfm.models.vit import create_encoder
from visionfm.tasks.segmentation.data import SegAugmentation
from visionfm.tasks.segmentation.model import build_segmentor
from visionfm.tasks.segmentation.runner import _batch, lr_multipliers, param_groups, predict_probability, tta_views
from visionfm.weights.export import save_encoder

MEAN, STD = [0.5, 0.4, 0.3], [0.25, 0.2, 0.15]


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory):
    torch.manual_seed(0)
    encoder = create_encoder("vit_tiny", 16, 64)
    path = tmp_path_factory.mktemp("weights") / "cfp_vit_tiny.safetensors"
    save_encoder(encoder.state_dict(), path, {"modality": "cfp", "arch": "vit_tiny", "patch_size": 16, "img_size": 64,
                                              "mean": MEAN, "std": STD})
    return path, {k: v.clone() for k, v in encoder.state_dict().items()}


def _cfg(weights: Path, **model):
    cfg = build_config(CONFIG_DIR / "seg" / "default.yaml", None, {
        "model.weights": str(weights), "data.crop_size": 64, "model.blocks": [1, 3, 5, 11],
        "model.pyramid_channels": 32, "model.head_channels": 16, "model.stem_channels": [8, 16],
        "train.precision": "fp32"})
    cfg["model"].update(model)
    return cfg


def _train_steps(model, steps=3, lr=1e-3):
    torch.manual_seed(0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    images = torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8)
    labels = torch.zeros(2, 1, 64, 64, dtype=torch.long)
    labels[:, :, 20:40, 10:50] = 1
    losses = []
    model.train()
    for _ in range(steps):
        batch = model.data_preprocessor(_batch(images.float(), labels), training=True)
        loss, log_vars = model.parse_losses(model(**batch, mode="loss"))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, log_vars


@pytest.mark.parametrize("head", ["unetr", "uper", "fcn"])
def test_heads_train_and_predict(encoder_file, head):
    model, mm_cfg = build_segmentor(_cfg(encoder_file[0], head=head, freeze_encoder=False))
    assert type(model).__name__ == "EncoderDecoder" and type(model.backbone).__name__ == "VisionFMViT"
    losses, log_vars = _train_steps(model)
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert {"decode.loss_ce", "decode.loss_dice"} <= set(log_vars)
    image = np.random.default_rng(0).integers(0, 255, (80, 100, 3), dtype=np.uint8)  # not a multiple of 16
    prob = predict_probability(model, image, (80, 100), torch.device("cpu"), None)
    assert prob.shape == (80, 100) and 0 <= prob.min() <= prob.max() <= 1


def test_unetr_head_sees_full_resolution(encoder_file):
    model, _ = build_segmentor(_cfg(encoder_file[0]))
    feats = model.extract_feat(torch.zeros(1, 3, 64, 64))
    assert [tuple(f.shape[-2:]) for f in feats] == [(64, 64), (16, 16), (8, 8), (4, 4), (2, 2)]
    logits = model.decode_head(feats)
    assert logits.shape == (1, 2, 64, 64)  # the UNETR-like head predicts at full resolution, not at stride 4


@pytest.mark.parametrize("stems", [[8, 16], [8, 16, 32], [4, 8, 16, 32]])
def test_unetr_image_path_depth(encoder_file, stems):
    """Each image-path stage runs at stride 2**i and the decoder comes back down through all of them."""
    model, _ = build_segmentor(_cfg(encoder_file[0], stem_channels=stems))
    head = model.decode_head
    feats = model.extract_feat(torch.zeros(1, 3, 64, 64))
    seen = []
    hooks = [stem.register_forward_hook(lambda m, i, o: seen.append((o.shape[1], o.shape[-1]))) for stem in head.stems]
    assert head(feats).shape == (1, 2, 64, 64)
    for hook in hooks:
        hook.remove()
    assert seen == [(c, 64 // 2 ** i) for i, c in enumerate(stems)]
    losses, _ = _train_steps(model)
    assert losses[-1] < losses[0]


def test_unetr_head_loads_checkpoints_of_the_two_stage_naming(encoder_file):
    """best.pth files written before the image path took a depth name its layers stem_full/stem_half/
    fuse_full/fuse_half; they load strictly and give the same output."""
    from visionfm.tasks.segmentation.head import VisionFMUNETRHead

    torch.manual_seed(0)
    model, _ = build_segmentor(_cfg(encoder_file[0]))
    legacy = {}
    for key, value in model.decode_head.state_dict().items():
        for old, new in VisionFMUNETRHead._LEGACY_NAMES.items():
            key = key.replace(new, old, 1) if key.startswith(new) else key
        legacy[key] = value
    assert any(k.startswith("stem_full.") for k in legacy) and not any(k.startswith("stems.") for k in legacy)
    fresh, _ = build_segmentor(_cfg(encoder_file[0]))
    fresh.decode_head.load_state_dict(legacy, strict=True)
    feats = model.extract_feat(torch.rand(1, 3, 64, 64))
    model.eval(), fresh.eval()
    assert torch.equal(model.decode_head(feats), fresh.decode_head(feats))
    with pytest.raises(ValueError, match="stem_channels"):
        build_segmentor(_cfg(encoder_file[0], stem_channels=[8]))


def test_pretrained_weights_survive_init_and_normalisation_from_metadata(encoder_file):
    path, state = encoder_file
    model, mm_cfg = build_segmentor(_cfg(path))
    loaded = model.backbone.encoder.state_dict()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key
    assert torch.allclose(model.data_preprocessor.mean.flatten(), torch.tensor(MEAN) * 255)
    assert torch.allclose(model.data_preprocessor.std.flatten(), torch.tensor(STD) * 255)
    random_model, _ = build_segmentor(_cfg(path, random_init=True))
    assert not torch.equal(random_model.backbone.encoder.blocks[0].attn.qkv.weight, state["blocks.0.attn.qkv.weight"])


def test_frozen_encoder_gets_no_gradients(encoder_file):
    path, state = encoder_file
    model, _ = build_segmentor(_cfg(path, freeze_encoder=True))
    _train_steps(model, steps=2, lr=1e-2)
    assert all(not p.requires_grad for p in model.backbone.encoder.parameters())
    for key, value in model.backbone.encoder.state_dict().items():
        assert torch.equal(value, state[key]), key
    model.train()
    assert not model.backbone.encoder.training and model.decode_head.training


def test_any_mmseg_head_from_config(encoder_file):
    head = dict(type="ASPPHead", in_index=3, dilations=(1, 6), channels=16, dropout_ratio=0.0)
    model, mm_cfg = build_segmentor(_cfg(encoder_file[0], decode_head=head))
    assert type(model.decode_head).__name__ == "ASPPHead" and mm_cfg["decode_head"]["in_channels"] == 32
    losses, _ = _train_steps(model, steps=1)
    assert np.isfinite(losses[0])


def test_bad_blocks_and_inputs_are_errors(encoder_file):
    with pytest.raises(ValueError, match="blocks 0..11"):
        build_segmentor(_cfg(encoder_file[0], blocks=[3, 5, 7, 12]))
    model, _ = build_segmentor(_cfg(encoder_file[0]))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model.backbone(torch.zeros(1, 3, 70, 64))


def test_layer_decay_groups(encoder_file):
    model, _ = build_segmentor(_cfg(encoder_file[0], freeze_encoder=False))
    groups = param_groups(model, lr=1.0, weight_decay=0.05, layer_decay=0.5)
    scale_of = {}
    for g in groups:
        for p in g["params"]:
            scale_of[id(p)] = (g["lr_scale"], g["weight_decay"])
    enc = model.backbone.encoder
    assert scale_of[id(enc.blocks[11].attn.qkv.weight)] == (0.5, 0.05)
    assert scale_of[id(enc.blocks[0].attn.qkv.weight)] == (0.5 ** 12, 0.05)
    assert scale_of[id(enc.patch_embed.proj.weight)] == (0.5 ** 13, 0.05)
    assert scale_of[id(enc.pos_embed)] == (0.5 ** 13, 0.0)
    assert scale_of[id(enc.blocks[3].norm1.weight)][1] == 0.0
    assert scale_of[id(model.decode_head.conv_seg.weight)] == (1.0, 0.05)
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in model.parameters() if p.requires_grad)


def test_layer_decay_means_what_it_means_in_classification(encoder_file):
    """``layer_decay`` (timm's ``param_groups_layer_decay`` in both tasks): every encoder parameter gets the lr scale
    and weight decay that classification fine-tuning gives it; the neck and heads learn at the full rate, as the
    classifier's head does; frozen encoders leave only those."""
    from visionfm.tasks.classification.finetune import EncoderClassifier, finetune_param_groups

    model, _ = build_segmentor(_cfg(encoder_file[0], freeze_encoder=False))
    enc = model.backbone.encoder
    ours = {id(p): (g["lr_scale"], g["weight_decay"], g["lr"]) for g in param_groups(model, 2.0, 0.05, 0.6)
            for p in g["params"]}
    theirs = {id(p): (g["lr_scale"], g["weight_decay"]) for g in
              finetune_param_groups(EncoderClassifier(enc, torch.nn.Linear(enc.embed_dim, 2)), 0.05, 0.6)
              for p in g["params"]}
    for name, p in enc.named_parameters():
        assert ours[id(p)][:2] == theirs[id(p)], name
        assert ours[id(p)][2] == 2.0 * ours[id(p)][0]
    others = [p for n, p in model.named_parameters() if not n.startswith("backbone.encoder.")]
    assert others and all(ours[id(p)][0] == 1.0 for p in others)
    assert len({s for s, _, _ in ours.values()}) == len(enc.blocks) + 2
    frozen, _ = build_segmentor(_cfg(encoder_file[0], freeze_encoder=True))
    groups = param_groups(frozen, 1.0, 0.05, 0.6)
    assert {g["lr_scale"] for g in groups} == {1.0}
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in frozen.parameters())


def test_lr_schedule():
    m = lr_multipliers(10, 2, 0.1)
    assert m[0] == pytest.approx(0.5) and m[1] == pytest.approx(1.0) and m[-1] > 0.1 and np.all(np.diff(m[1:]) <= 0)


def test_slide_inference_covers_large_images(encoder_file):
    cfg = _cfg(encoder_file[0])
    cfg["test"]["stride"] = 32
    model, mm_cfg = build_segmentor(cfg)
    assert mm_cfg["test_cfg"] == dict(mode="slide", crop_size=(64, 64), stride=(32, 32))
    image = np.random.default_rng(1).integers(0, 255, (150, 130, 3), dtype=np.uint8)
    calls = []
    hook = model.backbone.register_forward_hook(lambda m, i, o: calls.append(tuple(i[0].shape[-2:])))
    prob = predict_probability(model, image, (150, 130), torch.device("cpu"), None)
    hook.remove()
    assert prob.shape == (150, 130)
    assert set(calls) == {(64, 64)} and len(calls) == 4 * 4  # padded to 160x144: 4 x 4 windows of 64, stride 32
    whole = copy.deepcopy(cfg)
    whole["test"]["mode"] = "whole"
    assert build_segmentor(whole)[1]["test_cfg"]["mode"] == "whole"


def test_augmentation_keeps_image_and_label_aligned():
    torch.manual_seed(0)
    images = torch.zeros(4, 3, 32, 32, dtype=torch.uint8)
    images[:, :, 4:10, 20:30] = 255
    labels = (images[:, :1] > 0).long()
    x, y = SegAugmentation(rotate_degrees=30, colour_jitter=0.0)(images, labels)
    inside = y != 255
    assert torch.equal((x[:, :1] > 127)[inside], (y == 1)[inside]) or \
        ((x[:, :1] > 127)[inside] != (y == 1)[inside]).float().mean() < 0.02  # nearest vs bilinear at edges
    assert (y == 255).any()  # rotated corners are ignored, not called background


def test_tta_views_are_undone_exactly(encoder_file):
    """Averaging over the 8 symmetries of the square makes the prediction equivariant: the prediction of a rotated
    or mirrored image is the rotated or mirrored prediction. Fails if any view is mapped back wrongly (including
    the swapped height and width of odd quarter turns on a non-square image)."""
    assert len(tta_views(True, True)) == 8 and len(set(tta_views(True, True))) == 8
    assert len(tta_views(False, True)) == 4 and tta_views(True, False)[0] == (0, ()) and tta_views(False, False) == [(0, ())]
    torch.manual_seed(0)
    model, _ = build_segmentor(_cfg(encoder_file[0]))
    model.eval()
    image = np.random.default_rng(2).integers(0, 255, (80, 112, 3), dtype=np.uint8)
    cpu = torch.device("cpu")
    prob = predict_probability(model, image, (80, 112), cpu, None, flip=True, rot90=True)
    turned = predict_probability(model, np.rot90(image).copy(), (112, 80), cpu, None, flip=True, rot90=True)
    mirrored = predict_probability(model, image[:, ::-1].copy(), (80, 112), cpu, None, flip=True, rot90=True)
    assert prob.shape == (80, 112)
    np.testing.assert_allclose(turned, np.rot90(prob), atol=1e-5)
    np.testing.assert_allclose(mirrored, prob[:, ::-1], atol=1e-5)
    plain = predict_probability(model, image, (80, 112), cpu, None)
    assert np.abs(plain - prob).max() > 1e-4  # the views do change the answer of an untrained model


def test_step_benchmark_prints_a_row_per_variant(capsys):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "seg_step.py"
    spec = importlib.util.spec_from_file_location("seg_step_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads_before = torch.get_num_threads()
    tiny = ["--set", "data.crop_size=64", "--set", "optim.batch_size=2", "--set", "model.pyramid_channels=16",
            "--set", "model.blocks=[1,3,5,11]", "--set", "model.stem_channels=[8,16]"]
    rc = bench.main([*tiny, "--compare", "model.stem_channels=[8,16,32]", "--compare", "model.freeze_encoder=true",
                     "--repeats", "1", "--threads", "1"])
    assert rc == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[2:]}
    assert set(rows) == {"base", "model.stem_channels=[8,16,32]", "model.freeze_encoder=true"}
    assert rows["base"][-1] == "1.00x"
    # a deeper image path adds parameters; freezing the encoder removes none
    assert float(rows["model.stem_channels=[8,16,32]"][1]) > float(rows["base"][1])
    assert rows["model.freeze_encoder=true"][1] == rows["base"][1]
    assert all(float(v) > 0 for row in rows.values() for v in row[2:5])
    assert torch.get_num_threads() == threads_before


def test_validation_with_threshold_val_scores_at_the_best_threshold(encoder_file):
    """``test.threshold: val``: checkpoints are compared by the validation Dice at its best threshold, the way the
    test split is cut. A model whose foreground probabilities all lie under 0.5 (early in a short schedule) has
    Dice 0 at 0.5 for every checkpoint, which made DRIVE's 200-step transfer row 0.000 for both encoders."""
    from types import SimpleNamespace

    from visionfm.engine.loop import RunContext
    from visionfm.tasks.segmentation.data import LoadedImage
    from visionfm.tasks.segmentation.runner import _pooled_validation

    model, _ = build_segmentor(_cfg(encoder_file[0]))
    with torch.no_grad():  # push every foreground probability under 0.5 (class 1 logit 1 below class 0)
        model.decode_head.conv_seg.bias.copy_(torch.tensor([0.5, -0.5]))
    rng = np.random.default_rng(0)
    images = []
    for i in range(2):
        image = rng.integers(0, 120, (64, 64, 3), dtype=np.uint8)
        mask = np.zeros((64, 64), bool)
        mask[:, 10 + 20 * i] = mask[30] = True
        image[mask] = 230
        images.append(LoadedImage(SimpleNamespace(name=f"v{i}"), image, mask, np.ones_like(mask), (64, 64)))
    ctx = RunContext(torch.device("cpu"))

    at_half = _pooled_validation(model, images, 0.5, ctx, None)
    assert at_half["threshold"] == 0.5 and at_half["dice"] == 0.0  # nothing above 0.5
    best = _pooled_validation(model, images, None, ctx, None)
    assert best["threshold"] < 0.5 and best["dice"] > 0.0
    assert best["auc"] == at_half["auc"]  # threshold-free metrics do not move
