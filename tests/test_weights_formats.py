"""Foreign checkpoint layouts mapped onto our timm ViT: key by key and output by output.

Every checkpoint is built here in its publisher's layout from a small, fully randomised timm ViT (width 192,
2 blocks, 64-pixel images), so a key that is dropped, swapped or left at its initial value changes the output.
"""

from __future__ import annotations

import argparse

import pytest
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

from visionfm.weights import (WeightsNotFoundError, load_encoder, load_foreign_checkpoint, read_foreign_checkpoint,
                              save_encoder, update_index)
from visionfm.weights.formats import IMAGENET_MEAN, IMAGENET_STD, VISIONFM_NORMALISATION, map_to_timm

IMG = 64


def make_vit(seed: int = 0, embed_dim: int = 192, depth: int = 2, num_heads: int = 3, patch_size: int = 16,
             img_size: int = IMG, **kwargs) -> VisionTransformer:
    """A small timm ViT whose every tensor is random (LayerNorm weights and layer scales included)."""
    torch.manual_seed(seed)
    model = VisionTransformer(img_size=img_size, patch_size=patch_size, num_classes=kwargs.pop("num_classes", 0),
                              dynamic_img_size=True, embed_dim=embed_dim, depth=depth, num_heads=num_heads, **kwargs)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model.eval()


def images(size: int = IMG, seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


def features(model: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval().forward_features(x)


def pooled(model: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval().forward_head(model.forward_features(x), pre_logits=True)


def head_tensors(prefix: str, dim: int = 192) -> dict:
    """A DINO/iBOT projection head's tensors (MLP, weight-normalised last layer)."""
    return {f"{prefix}head.mlp.0.weight": torch.randn(64, dim), f"{prefix}head.mlp.0.bias": torch.randn(64),
            f"{prefix}head.mlp.2.weight": torch.randn(32, 64), f"{prefix}head.last_layer.weight_g": torch.ones(128, 1),
            f"{prefix}head.last_layer.weight_v": torch.randn(128, 32)}


def assert_same_state(mapped: dict, reference: dict) -> None:
    assert sorted(mapped) == sorted(reference)
    for key, value in reference.items():
        assert torch.equal(mapped[key], value), key


def visionfm_checkpoint(path, teacher: VisionTransformer, student: VisionTransformer, modality: str = "Fundus"):
    """VisionFM's pretraining checkpoint: iBOT teacher/student in a multi-crop wrapper, DDP student."""
    ckpt = {
        "teacher": {**{f"backbone.{k}": v for k, v in teacher.state_dict().items()}, **head_tensors("")},
        "student": {**{f"module.backbone.{k}": v for k, v in student.state_dict().items()},
                    "module.backbone.masked_embed": torch.randn(1, 192), **head_tensors("module.")},
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]},
        "epoch": 400,
        "args": argparse.Namespace(arch="vit_tiny", modality=modality, patch_size=16, input_size=IMG, out_dim=128),
        "ibot_loss": {"center": torch.zeros(1, 128), "center2": torch.zeros(1, 1, 128)},
        "fp16_scaler": {"scale": 65536.0, "growth_factor": 2.0},
    }
    torch.save(ckpt, path)
    return path


def test_visionfm_official_checkpoint_maps_teacher_exactly(tmp_path):
    teacher, student = make_vit(0), make_vit(1)
    path = visionfm_checkpoint(tmp_path / "VFM_Fundus_weights.pth", teacher, student)

    foreign = read_foreign_checkpoint(path, "cfp")
    assert_same_state(foreign.state, teacher.state_dict())
    assert foreign.report.source_format == "visionfm-official"
    assert foreign.report.dropped["DINO/iBOT projection head"] == sorted(head_tensors(""))
    meta = foreign.metadata
    assert (meta["modality"], meta["arch"], meta["patch_size"], meta["img_size"], meta["num_heads"], meta["epoch"]) \
        == ("cfp", "vit_tiny_d2", 16, IMG, 3, 400)
    assert meta["mean"] == pytest.approx([0.424, 0.261, 0.128], abs=6e-4)
    assert meta["std"] == pytest.approx([0.295, 0.202, 0.137], abs=6e-4)

    encoder, info = load_encoder("Fundus", weights=path)
    x = images()
    torch.testing.assert_close(features(encoder, x), features(teacher, x), rtol=0, atol=0)
    assert info.modality == "cfp" and info.arch == "vit_tiny_d2" and info.pretrained
    assert info.mean == pytest.approx(VISIONFM_NORMALISATION["cfp"][0])
    assert info.key_report.ok and info.key_report.mapped == len(teacher.state_dict())


def test_visionfm_student_entry_drops_ddp_prefix_and_mask_embedding(tmp_path):
    teacher, student = make_vit(0), make_vit(1)
    path = visionfm_checkpoint(tmp_path / "VFM_OCT_weights.pth", teacher, student, modality="OCT")
    foreign = read_foreign_checkpoint(path, "oct", checkpoint_key="student")
    assert_same_state(foreign.state, student.state_dict())
    assert foreign.report.dropped["iBOT mask embedding (pretraining only)"] == ["masked_embed"]
    assert foreign.metadata["mean"] == pytest.approx(VISIONFM_NORMALISATION["oct"][0])
    encoder, _ = load_encoder("OCT", weights=path, checkpoint_key="student")
    x = images()
    torch.testing.assert_close(features(encoder, x), features(student, x), rtol=0, atol=0)


def test_dino_training_checkpoint(tmp_path):
    teacher, student = make_vit(2), make_vit(3)
    ckpt = {"student": {**{f"module.backbone.{k}": v for k, v in student.state_dict().items()},
                        **head_tensors("module.")},
            "teacher": {**{f"backbone.{k}": v for k, v in teacher.state_dict().items()}, **head_tensors("")},
            "optimizer": {"state": {}, "param_groups": []}, "epoch": 100,
            "args": argparse.Namespace(arch="vit_tiny", patch_size=16, out_dim=128, norm_last_layer=True),
            "dino_loss": {"center": torch.zeros(1, 128)}}
    torch.save(ckpt, tmp_path / "checkpoint.pth")
    state, meta = load_foreign_checkpoint(tmp_path / "checkpoint.pth", "cfp")
    assert_same_state(state, teacher.state_dict())
    assert meta["source_format"] == "dino" and meta["objective"] == "dino"
    assert meta["mean"] == list(IMAGENET_MEAN) and meta["std"] == list(IMAGENET_STD)
    encoder, info = load_encoder("cfp", weights=tmp_path / "checkpoint.pth")
    torch.testing.assert_close(features(encoder, images()), features(teacher, images()), rtol=0, atol=0)
    assert info.mean == IMAGENET_MEAN


def test_ibot_released_state_dict(tmp_path):
    model = make_vit(4)
    state = {**{f"module.backbone.{k}": v for k, v in model.state_dict().items()},
             "module.backbone.masked_embed": torch.randn(1, 192), **head_tensors("module.")}
    torch.save({"state_dict": state}, tmp_path / "checkpoint_teacher.pth")
    foreign = read_foreign_checkpoint(tmp_path / "checkpoint_teacher.pth", "oct")
    assert foreign.report.source_format == "ibot"
    assert_same_state(foreign.state, model.state_dict())
    assert foreign.metadata["modality"] == "oct"


def test_retfound_mae_pretraining_checkpoint(tmp_path):
    model = make_vit(5)
    decoder = {"mask_token": torch.randn(1, 1, 192), "decoder_embed.weight": torch.randn(96, 192),
               "decoder_embed.bias": torch.randn(96), "decoder_pos_embed": torch.randn(1, 17, 96),
               "decoder_blocks.0.norm1.weight": torch.randn(96),
               "decoder_blocks.0.attn.qkv.weight": torch.randn(288, 96),
               "decoder_norm.weight": torch.randn(96), "decoder_pred.weight": torch.randn(768, 96)}
    ckpt = {"model": {**model.state_dict(), **decoder}, "optimizer": {"state": {}, "param_groups": []},
            "epoch": 799, "scaler": {"scale": 1024.0},
            "args": argparse.Namespace(model="mae_vit_tiny_patch16", input_size=IMG, mask_ratio=0.75)}
    path = tmp_path / "RETFound_cfp_weights.pth"
    torch.save(ckpt, path)
    foreign = read_foreign_checkpoint(path, "cfp")
    assert foreign.report.source_format == "mae"
    assert_same_state(foreign.state, model.state_dict())
    assert sorted(foreign.report.dropped["MAE decoder"]) == sorted(k for k in decoder if k.startswith("decoder_"))
    assert foreign.report.dropped["MAE mask token (pretraining only)"] == ["mask_token"]
    assert foreign.metadata["mean"] == list(IMAGENET_MEAN)
    encoder, _ = load_encoder("cfp", weights=path)
    torch.testing.assert_close(features(encoder, images()), features(model, images()), rtol=0, atol=0)


def test_finetuned_global_pool_checkpoint_keeps_fc_norm(tmp_path):
    model = make_vit(6, global_pool="avg", fc_norm=True, num_classes=5)
    state = model.state_dict()
    assert "fc_norm.weight" in state and "norm.weight" not in state and "head.weight" in state
    torch.save({"model": state, "epoch": 50}, tmp_path / "RETFound_finetuned.pth")
    encoder, info = load_encoder("cfp", weights=tmp_path / "RETFound_finetuned.pth")
    assert info.key_report.dropped["classifier head"] == ["head.bias", "head.weight"]
    assert encoder.global_pool == "avg"
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), pooled(model, x), rtol=0, atol=0)


def test_dinov2_layer_scale(tmp_path):
    model = make_vit(7, patch_size=14, img_size=56, init_values=1e-5)
    state = {**model.state_dict(), "mask_token": torch.zeros(1, 192)}
    assert "blocks.0.ls1.gamma" in state
    torch.save(state, tmp_path / "dinov2_vits14.pth")
    foreign = read_foreign_checkpoint(tmp_path / "dinov2_vits14.pth", "cfp")
    assert foreign.report.source_format == "dinov2"
    assert foreign.report.dropped == {"DINOv2 mask token (pretraining only)": ["mask_token"]}
    assert_same_state(foreign.state, model.state_dict())
    encoder, info = load_encoder("cfp", weights=tmp_path / "dinov2_vits14.pth")
    assert info.patch_size == 14 and info.img_size == 56
    x = images(56)
    torch.testing.assert_close(features(encoder, x), features(model, x), rtol=0, atol=0)


def test_dinov2_registers_fold_cls_position(tmp_path):
    """DINOv2 adds pos_embed[:, 0] to the CLS token and has no position entries for registers; timm's register
    layout has position entries for patches only. The mapping must fold the CLS entry into the token."""
    model = make_vit(8, patch_size=14, img_size=56, init_values=1e-5, reg_tokens=4, no_embed_class=True)
    ref = model.state_dict()
    cls_pos = torch.randn(1, 1, 192)
    dinov2 = {k: v for k, v in ref.items() if k not in ("reg_token", "cls_token", "pos_embed")}
    dinov2.update({"cls_token": ref["cls_token"] - cls_pos, "pos_embed": torch.cat([cls_pos, ref["pos_embed"]], 1),
                   "register_tokens": ref["reg_token"], "mask_token": torch.zeros(1, 192)})
    save_file({k: v.contiguous() for k, v in dinov2.items()}, str(tmp_path / "dinov2_vits14_reg4.safetensors"))

    state, _ = load_foreign_checkpoint(tmp_path / "dinov2_vits14_reg4.safetensors", "cfp")
    assert sorted(state) == sorted(ref)
    assert torch.equal(state["pos_embed"], ref["pos_embed"]) and torch.equal(state["reg_token"], ref["reg_token"])
    torch.testing.assert_close(state["cls_token"], ref["cls_token"])
    encoder, _ = load_encoder("cfp", weights=tmp_path / "dinov2_vits14_reg4.safetensors")
    x = images(56)
    torch.testing.assert_close(features(encoder, x), features(model, x))


def test_dinov2_swiglu_is_refused_clearly(tmp_path):
    state = make_vit(9, init_values=1e-5).state_dict()
    state["blocks.0.mlp.w12.weight"] = state.pop("blocks.0.mlp.fc1.weight")
    torch.save(state, tmp_path / "dinov2_vitg14.pth")
    with pytest.raises(ValueError, match="SwiGLU"):
        load_encoder("cfp", weights=tmp_path / "dinov2_vitg14.pth")


def test_timm_state_dict_with_classifier_and_ddp_prefix(tmp_path):
    model = make_vit(10, num_classes=7)
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, tmp_path / "timm.pth")
    encoder, info = load_encoder("cfp", weights=tmp_path / "timm.pth")
    assert info.key_report.source_format == "timm"
    assert info.key_report.dropped == {"classifier head": ["head.bias", "head.weight"]}
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), pooled(model, x), rtol=0, atol=0)


def test_timm_safetensors_without_our_metadata(tmp_path):
    model = make_vit(11)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    encoder, info = load_encoder("oct", weights=tmp_path / "model.safetensors")
    assert info.key_report.source_format == "timm" and info.mean == IMAGENET_MEAN
    torch.testing.assert_close(features(encoder, images()), features(model, images()), rtol=0, atol=0)


def test_unexpected_key_fails_and_is_named(tmp_path):
    state = make_vit(12).state_dict()
    state["blocks.0.attn.extra_scale"] = torch.ones(3)
    torch.save(state, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match=r"unexpected \['blocks.0.attn.extra_scale'\]"):
        load_encoder("cfp", weights=tmp_path / "odd.pth")


def test_missing_key_fails_and_is_named(tmp_path):
    state = make_vit(13).state_dict()
    del state["blocks.1.mlp.fc2.bias"]
    torch.save({"teacher": {f"backbone.{k}": v for k, v in state.items()}}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"missing \['blocks.1.mlp.fc2.bias'\]"):
        load_encoder("cfp", weights=tmp_path / "partial.pth")


def test_decoder_keys_are_not_dropped_outside_the_mae_layout():
    """A key is dropped only by a layout that knows it; elsewhere it stays and the loader rejects it."""
    state = {"blocks.0.norm1.weight": torch.ones(2), "decoder_pred.weight": torch.ones(2)}
    mapped, report = map_to_timm(state, "timm")
    assert "decoder_pred.weight" in mapped and not report.dropped
    mapped, report = map_to_timm(state, "mae")
    assert "decoder_pred.weight" not in mapped and report.dropped == {"MAE decoder": ["decoder_pred.weight"]}


def test_own_export_round_trip_and_position_interpolation(tmp_path):
    model = make_vit(14)
    meta = {"format": "visionfm-encoder/1", "modality": "oct", "arch": "vit_tiny_d2", "patch_size": 16,
            "img_size": IMG, "mean": [0.2, 0.2, 0.2], "std": [0.1, 0.1, 0.1], "steps": 10, "data": "unit test"}
    save_encoder(model.state_dict(), tmp_path / "oct_vit_tiny_d2.safetensors", meta)
    encoder, info = load_encoder("oct", weights=tmp_path / "oct_vit_tiny_d2.safetensors", img_size=96)
    assert info.img_size == 96 and encoder.pos_embed.shape[1] == 1 + 6 * 6
    assert info.mean == (0.2, 0.2, 0.2) and info.key_report.ok
    x = images(96)  # the reference interpolates its 4x4 grid on the fly; the loader did it once at load time
    torch.testing.assert_close(features(encoder, x), features(model, x))


def test_metadata_arch_must_match_the_weights(tmp_path):
    model = make_vit(15)
    save_encoder(model.state_dict(), tmp_path / "cfp_vit_tiny.safetensors",
                 {"modality": "cfp", "arch": "vit_tiny", "patch_size": 16, "img_size": IMG})
    with pytest.raises(ValueError, match="metadata says vit_tiny, but the weights are a vit_tiny_d2"):
        load_encoder("cfp", weights=tmp_path / "cfp_vit_tiny.safetensors")


def test_nonstandard_width_needs_num_heads(tmp_path):
    model = make_vit(16, embed_dim=48, num_heads=3)
    torch.save(model.state_dict(), tmp_path / "narrow.pth")
    with pytest.raises(ValueError, match="num_heads"):
        load_encoder("cfp", weights=tmp_path / "narrow.pth")
    encoder, info = load_encoder("cfp", weights=tmp_path / "narrow.pth", num_heads=3)
    assert info.arch == "vit_e48_d2_h3"
    torch.testing.assert_close(features(encoder, images()), features(model, images()), rtol=0, atol=0)
    wrong, _ = load_encoder("cfp", weights=tmp_path / "narrow.pth", num_heads=4)
    assert not torch.allclose(features(wrong, images()), features(model, images()))


def test_resolution_by_modality_and_clear_error(tmp_path):
    model = make_vit(17)
    meta = {"modality": "cfp", "arch": "vit_tiny_d2", "patch_size": 16, "img_size": IMG}
    sha = save_encoder(model.state_dict(), tmp_path / "cfp_vit_tiny_d2.safetensors", meta)
    update_index(tmp_path, "cfp_vit_tiny_d2.safetensors", meta, sha)
    encoder, info = load_encoder("Fundus", weights_dir=tmp_path)
    assert info.source == str(tmp_path / "cfp_vit_tiny_d2.safetensors")
    torch.testing.assert_close(features(encoder, images()), features(model, images()), rtol=0, atol=0)
    with pytest.raises(WeightsNotFoundError, match=r"no oct encoder weights.*cfp_vit_tiny_d2.safetensors.*convert"):
        load_encoder("OCT", weights_dir=tmp_path)


def test_dinov2_chunked_blocks_are_renumbered():
    """DINOv2's FSDP block chunks (blocks.<chunk>.<index>.) become timm's blocks.<index>."""
    state = {"blocks.0.0.norm1.weight": torch.ones(2), "blocks.0.1.norm1.weight": torch.zeros(2),
             "blocks.1.2.norm1.weight": torch.full((2,), 2.0), "blocks.1.3.ls1.gamma": torch.full((2,), 3.0)}
    mapped, _ = map_to_timm(state, "dinov2")
    assert sorted(mapped) == ["blocks.0.norm1.weight", "blocks.1.norm1.weight", "blocks.2.norm1.weight",
                              "blocks.3.ls1.gamma"]
    assert torch.equal(mapped["blocks.2.norm1.weight"], torch.full((2,), 2.0))
