"""Build an mmseg ``EncoderDecoder`` (our ViT backbone + pyramid neck + any mmseg decode head) from the run config.

The ``model`` section of ``configs/seg/*.yaml`` names the encoder (modality, weights, blocks, frozen or
fine-tuned) and either a head shortcut (``head: unetr | uper | fcn``) or a full mmseg decode head config
(``decode_head: {type: ..., ...}``, ``auxiliary_head``), which is passed to mmseg's registry as is. The input
normalisation (mmseg's ``SegDataPreProcessor``) is the one stored in the encoder weights' metadata.

Two mmseg 1.2.2 facts shape the loss: ``DiceLoss`` one-hot encodes labels as ``labels[..., :C]``, which for a
single-channel (sigmoid) output is the *background* indicator, and its ``ignore_index`` drops a *class
channel*, not pixels. Binary tasks therefore use two output channels (softmax), cross-entropy (which does
ignore label 255) plus Dice with ``ignore_index=0`` (Dice on the foreground channel only).
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Dict, Optional, Tuple

from mmengine.config import ConfigDict
from mmengine.logging import MMLogger
from mmengine.registry import DefaultScope
from mmseg.registry import MODELS
from torch import nn

from ...weights.loader import EncoderInfo, load_encoder
from ...models import mm_backbone as _backbone  # noqa: F401  (registers VisionFMViT)
from . import head as _head  # noqa: F401  (registers VisionFMUNETRHead)
from . import neck as _neck  # noqa: F401  (registers VisionFMPyramidNeck)

__all__ = ["HEADS", "loss_config", "segmentor_config", "build_segmentor", "encoder_record"]

HEADS = ("unetr", "uper", "fcn")


def loss_config(cfg: Dict[str, Any]) -> list:
    """Cross-entropy + foreground Dice (see the module docstring for why Dice ignores channel 0)."""
    loss = cfg.get("loss", {})
    out = [dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=float(loss.get("ce_weight", 1.0)),
                avg_non_ignore=True, loss_name="loss_ce")]
    if float(loss.get("dice_weight", 0.0)) > 0:
        out.append(dict(type="DiceLoss", use_sigmoid=False, ignore_index=0, naive_dice=True,
                        loss_weight=float(loss["dice_weight"]), loss_name="loss_dice"))
    return out


def _norm_cfg(model: Dict[str, Any]) -> dict:
    norm = str(model.get("norm", "GN")).upper()
    if norm == "GN":
        return dict(type="GN", num_groups=int(model.get("norm_groups", 16)), requires_grad=True)
    if norm == "BN":
        return dict(type="BN", requires_grad=True)
    raise ValueError(f"model.norm must be GN or BN, got {norm!r}")


def _head_shortcut(kind: str, n_levels: int, channels: int, norm_cfg: dict, model: Dict[str, Any]) -> dict:
    common = dict(num_classes=2, out_channels=2, norm_cfg=norm_cfg, align_corners=False)
    if kind == "unetr":
        return dict(type="VisionFMUNETRHead", in_channels=[3] + [channels] * n_levels,
                    in_index=list(range(n_levels + 1)), input_transform="multiple_select",
                    channels=int(model.get("head_channels", 16)), decoder_channels=channels,
                    stem_channels=tuple(model.get("stem_channels", (16, 32))), dropout_ratio=0.0, **common)
    if kind == "uper":
        return dict(type="UPerHead", in_channels=[channels] * n_levels, in_index=list(range(n_levels)),
                    pool_scales=(1, 2, 3, 6), channels=channels, dropout_ratio=0.1, **common)
    if kind == "fcn":
        return dict(type="FCNHead", in_channels=channels, in_index=0, channels=channels, num_convs=2,
                    concat_input=False, dropout_ratio=0.1, **common)
    raise ValueError(f"model.head must be one of {', '.join(HEADS)} (or give model.decode_head), got {kind!r}")


def segmentor_config(cfg: Dict[str, Any], info: EncoderInfo, depth: int,
                     weights: Optional[str] = None, random_init: Optional[bool] = None) -> Dict[str, Any]:
    """The mmseg model config (a plain dict) for a run config and the encoder it uses."""
    model = cfg["model"]
    data, test = cfg["data"], cfg["test"]
    blocks = list(model.get("blocks") or [])
    if not blocks:  # default: the ends of the four quarters of the encoder, UNETR's choice: (2, 5, 8, 11) of 12
        blocks = sorted({max(0, (depth * q) // 4 - 1) for q in range(1, 5)})
    channels = int(model.get("pyramid_channels", 64))
    norm_cfg = _norm_cfg(model)
    scales = model.get("pyramid_scales")
    if not scales:  # finest first: strides p/4, p/2, p, 2p for four levels; fewer levels drop the finest
        scales = [4, 2, 1, 0.5][-len(blocks):] if len(blocks) <= 4 else []
    scales = list(scales)
    if len(scales) != len(blocks):
        raise ValueError(f"model.pyramid_scales needs one entry per block ({len(blocks)} blocks: {blocks})")
    if model.get("decode_head"):
        decode_head = copy.deepcopy(dict(model["decode_head"]))
        with_input = decode_head.get("type") == "VisionFMUNETRHead"
        levels = [3] + [channels] * len(blocks) if with_input else [channels] * len(blocks)
        decode_head.setdefault("in_channels", levels if decode_head.get("input_transform") else channels)
        decode_head.setdefault("num_classes", 2)
        decode_head.setdefault("out_channels", 2)
        decode_head.setdefault("norm_cfg", norm_cfg)
    else:
        kind = str(model.get("head", "unetr")).lower()
        with_input = kind == "unetr"
        decode_head = _head_shortcut(kind, len(blocks), channels, norm_cfg, model)
    decode_head.setdefault("loss_decode", loss_config(cfg))
    crop = int(data["crop_size"])
    stride = int(test.get("stride") or max(info.patch_size, (2 * crop // 3) // info.patch_size * info.patch_size))
    out = dict(
        type="EncoderDecoder",
        data_preprocessor=dict(type="SegDataPreProcessor", mean=[255.0 * v for v in info.mean],
                               std=[255.0 * v for v in info.std], bgr_to_rgb=False, pad_val=0, seg_pad_val=255,
                               size_divisor=info.patch_size, test_cfg=dict(size_divisor=info.patch_size)),
        backbone=dict(type="VisionFMViT", modality=info.modality,
                      weights=weights if weights is not None else model.get("weights"),
                      arch=model.get("arch"), img_size=crop,
                      random_init=bool(model.get("random_init")) if random_init is None else random_init,
                      out_indices=blocks, frozen=bool(model.get("freeze_encoder")),
                      drop_path_rate=float(model.get("drop_path_rate", 0.0)), with_input=with_input),
        neck=dict(type="VisionFMPyramidNeck", in_channels=[info.embed_dim] * len(blocks), out_channels=channels,
                  scales=scales, norm_cfg=norm_cfg),
        decode_head=decode_head,
        train_cfg=dict(),
        test_cfg=dict(mode=str(test.get("mode", "slide")), crop_size=(crop, crop), stride=(stride, stride)),
    )
    if model.get("auxiliary_head"):
        out["auxiliary_head"] = copy.deepcopy(dict(model["auxiliary_head"]))
    return out


def encoder_record(info: EncoderInfo) -> Dict[str, Any]:
    """What a checkpoint stores about its encoder (plain types, safe to load with ``weights_only=True``)."""
    arch = info.arch if info.patch_size == 16 else f"{info.arch}_patch{info.patch_size}"
    return {"modality": info.modality, "arch": arch, "patch_size": info.patch_size, "img_size": info.img_size,
            "embed_dim": info.embed_dim, "mean": list(info.mean), "std": list(info.std), "source": info.source}


def build_segmentor(cfg: Dict[str, Any], encoder: Optional[Dict[str, Any]] = None) -> Tuple[nn.Module, Dict[str, Any]]:
    """Build the mmseg model for a run config.

    Args:
        cfg: The merged run config (``modality``, ``model``, ``data``, ``test`` sections).
        encoder: An :func:`encoder_record` from a checkpoint: the encoder is then built randomly initialised
            with that architecture and normalisation (its weights come from the checkpoint), so the original
            weights file is not needed.

    Returns:
        ``(model, model_config)``: the ``EncoderDecoder`` (heads initialised, encoder as loaded) and its mmseg
        config.
    """
    model_cfg = cfg["model"]
    crop = int(cfg["data"]["crop_size"])
    if encoder is None:
        enc, info = load_encoder(cfg["modality"], weights=model_cfg.get("weights"), arch=model_cfg.get("arch"),
                                 img_size=crop, random_init=bool(model_cfg.get("random_init")))
        depth = len(enc.blocks)
        del enc
        mm_cfg = segmentor_config(cfg, info, depth)
    else:
        enc, info = load_encoder(encoder["modality"], arch=encoder["arch"], img_size=crop, random_init=True)
        depth = len(enc.blocks)
        del enc
        info.mean, info.std = tuple(encoder["mean"]), tuple(encoder["std"])
        mm_cfg = segmentor_config(cfg, info, depth, weights=None, random_init=True)
        mm_cfg["backbone"]["arch"] = encoder["arch"]
    if crop % info.patch_size:
        raise ValueError(f"data.crop_size {crop} is not a multiple of the encoder's patch size {info.patch_size}")
    with DefaultScope.overwrite_default_scope("mmseg"):  # nested builds (data preprocessor, losses) look in mmseg
        model = MODELS.build(ConfigDict(mm_cfg))  # mmseg reads test_cfg by attribute
    # Heads and neck get mmseg's init_cfg; VisionFMViT keeps its loaded weights. mmengine would log one INFO
    # record per parameter here: keep its logger at WARNING meanwhile.
    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        model.init_weights()
    finally:
        logger.setLevel(level)
    model.backbone.info.mean, model.backbone.info.std = info.mean, info.std
    return model, mm_cfg

