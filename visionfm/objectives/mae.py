"""Masked autoencoders (He et al., "Masked Autoencoders Are Scalable Vision Learners", 2021), the objective RETFound
pretrains its encoders with.

The pieces are lightly's: :class:`lightly.models.modules.MaskedVisionTransformerTIMM` wraps our timm ViT so that the
encoder sees only the patch tokens an image keeps (MAE's asymmetric design: with a mask ratio of 0.75 the encoder
runs on a quarter of the tokens); :class:`lightly.models.modules.MaskedVisionTransformerDecoderTIMM` is the
lightweight transformer decoder (learnt mask token, fixed 2-D sine-cosine position embedding); the masks, gathers
and scatters are lightly's token utilities (:func:`~lightly.models.utils.random_token_mask`,
:func:`~lightly.models.utils.get_at_index`, :func:`~lightly.models.utils.set_at_index`,
:func:`~lightly.models.utils.patchify`). lightly 1.6 deprecates ``MAEDecoderTIMM`` (a FutureWarning at
construction) in favour of ``MaskedVisionTransformerDecoderTIMM`` with the decoder's input embedding and pixel
prediction layers kept outside it; :class:`MAEModel` follows that pattern, with the same layers and initialisation
as ``MAEDecoderTIMM``.

The loss is the paper's normalised-pixel loss: mean squared error on the masked patches only, each target patch
normalised by its own mean and variance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Tuple

import numpy as np
import torch
from lightly.models.modules.masked_vision_transformer_decoder_timm import MaskedVisionTransformerDecoderTIMM
from lightly.models.modules.masked_vision_transformer_timm import MaskedVisionTransformerTIMM, init_weights
from lightly.models.utils import get_at_index, patchify, random_token_mask, repeat_token, set_at_index
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from .dino import cosine_schedule

__all__ = ["check_mask_ratio", "masked_patch_count", "normalize_patches", "MAELoss", "MAEModel", "MAESchedules"]


def check_mask_ratio(mask_ratio: Any) -> float:
    """``mask_ratio`` as a float, checked to lie strictly between 0 and 1.

    Raises:
        ValueError: naming the mask ratio, for a value that is not a number in ``(0, 1)``.
    """
    try:
        ratio = float(mask_ratio)
    except (TypeError, ValueError):
        raise ValueError(f"mask ratio must be a number strictly between 0 and 1, got {mask_ratio!r}") from None
    if not 0.0 < ratio < 1.0:  # also refuses NaN
        raise ValueError(f"mask ratio must lie strictly between 0 and 1 (the share of each image's patches hidden "
                         f"from the encoder; MAE uses 0.75), got {mask_ratio}")
    return ratio


def masked_patch_count(num_patches: int, mask_ratio: float) -> int:
    """How many of an image's ``num_patches`` patches :func:`lightly.models.utils.random_token_mask` masks: the
    encoder keeps ``int(num_patches * (1 - mask_ratio))`` (rounded down, as in MAE) and the rest are masked."""
    return num_patches - int(num_patches * (1.0 - check_mask_ratio(mask_ratio)))


def normalize_patches(patches: Tensor, eps: float = 1e-6) -> Tensor:
    """Normalise each patch (the last dimension) by its own mean and variance: MAE's ``norm_pix_loss`` targets
    (the unbiased variance and ``eps`` inside the square root, as in the paper's code)."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps).sqrt()


class MAELoss(nn.Module):
    """Mean squared error between the predicted and the true pixels of the masked patches, computed in fp32.

    With ``norm_pix_loss`` (MAE's default; better representations in the paper's ablation) each target patch is
    first normalised by its own mean and variance (:func:`normalize_patches`). The paper's code averages the
    per-patch error over the masked patches of the whole batch; every image masks the same number of patches, so
    that is the mean over all predicted values computed here.

    Args:
        norm_pix_loss: Normalise each target patch.
        eps: Added to the variance before its square root.
    """

    def __init__(self, norm_pix_loss: bool = True, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm_pix_loss = bool(norm_pix_loss)
        self.eps = float(eps)

    def forward(self, predictions: Tensor, targets: Tensor) -> Tensor:
        """``predictions`` and ``targets``: ``(B, M, patch_size**2 * C)`` for the ``M`` masked patches of each
        image (:meth:`MAEModel.forward` and :meth:`MAEModel.patch_targets`). Returns a scalar."""
        if predictions.shape != targets.shape:
            raise ValueError(f"MAE predictions {tuple(predictions.shape)} and targets {tuple(targets.shape)} differ "
                             "in shape")
        targets = targets.detach().float()
        if self.norm_pix_loss:
            targets = normalize_patches(targets, self.eps)
        return (predictions.float() - targets).pow(2).mean()


class MAEModel(nn.Module):
    """A masked autoencoder around a timm ViT: the encoder runs on the kept patch tokens (plus the class token), a
    light transformer decoder sees every position (the encoded tokens where they were kept, the decoder's mask
    token elsewhere) and predicts the pixels of the masked patches.

    The encoder is wrapped, not copied: :attr:`encoder` is the ``VisionTransformer`` given, and its ``state_dict``
    (timm's keys, no mask token, no decoder) is what a pretraining run exports. It is initialised as MAE does
    (lightly's defaults: linear layers and the patch embedding Xavier-uniform, class token N(0, 0.02), the position
    embedding a fixed 2-D sine-cosine table, frozen).

    Args:
        encoder: A timm ``VisionTransformer`` with one prefix token (the class token), e.g. from
            :func:`visionfm.models.vit.create_encoder`. Inputs must have its image size: the mask and the decoder's
            position embedding are laid out on its patch grid.
        decoder_dim: Decoder width (MAE: 512).
        decoder_depth: Decoder blocks (MAE: 8).
        decoder_num_heads: Decoder attention heads (MAE: 16).
        mlp_ratio: Decoder MLP width ratio.
        in_chans: Channels per predicted pixel (3: the normalised input, grey modalities repeated to 3).
    """

    def __init__(self, encoder: VisionTransformer, decoder_dim: int = 512, decoder_depth: int = 8,
                 decoder_num_heads: int = 16, mlp_ratio: float = 4.0, in_chans: int = 3) -> None:
        super().__init__()
        if getattr(encoder, "cls_token", None) is None or encoder.num_prefix_tokens != 1:
            raise ValueError(f"MAEModel needs a ViT with exactly one prefix token, the class token (the mask never "
                             f"hides token 0); this one has {encoder.num_prefix_tokens} prefix token(s)")
        if decoder_dim % decoder_num_heads:
            raise ValueError(f"MAE decoder width {decoder_dim} is not divisible by its {decoder_num_heads} heads "
                             "(mae.decoder_dim, mae.decoder_num_heads)")
        self.backbone = MaskedVisionTransformerTIMM(vit=encoder)
        # With idx_keep the encoder never sees masked tokens, so the backbone's own mask token stays unused; frozen,
        # it gets no optimiser state and DDP does not wait for its gradient.
        self.backbone.mask_token.requires_grad_(False)
        self.patch_size = int(encoder.patch_embed.patch_size[0])
        self.num_patches = int(encoder.patch_embed.num_patches)
        self.image_size = tuple(int(s) for s in encoder.patch_embed.img_size)
        self.in_chans = int(in_chans)
        self.decoder_embed = nn.Linear(encoder.embed_dim, decoder_dim)
        self.decoder = MaskedVisionTransformerDecoderTIMM(num_patches=self.num_patches, embed_dim=decoder_dim,
                                                          depth=decoder_depth, num_heads=decoder_num_heads,
                                                          num_prefix_tokens=encoder.num_prefix_tokens,
                                                          mlp_ratio=mlp_ratio)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch_size ** 2 * self.in_chans)
        self.decoder_embed.apply(init_weights)
        self.decoder_pred.apply(init_weights)

    @property
    def encoder(self) -> VisionTransformer:
        """The timm ViT being pretrained."""
        return self.backbone.vit

    @property
    def sequence_length(self) -> int:
        """Tokens per image: the class token and every patch."""
        return self.backbone.sequence_length

    def random_mask(self, batch_size: int, mask_ratio: float,
                    device: "torch.device | str | None" = None) -> Tuple[Tensor, Tensor]:
        """A fresh random mask per image, drawn from torch's global generator.

        Returns:
            ``(idx_keep, idx_mask)``: token indices ``(B, K)`` the encoder sees (the class token, index 0, first)
            and ``(B, M)`` of the masked patches, with ``M`` = :func:`masked_patch_count`.
        """
        masked = masked_patch_count(self.num_patches, mask_ratio)
        if masked == 0:
            raise ValueError(f"mask ratio {mask_ratio} masks none of the {self.num_patches} patches: raise it")
        return random_token_mask((batch_size, self.sequence_length), mask_ratio=float(mask_ratio),
                                 mask_class_token=False, device=device)

    def forward(self, images: Tensor, idx_keep: Tensor, idx_mask: Tensor) -> Tensor:
        """Predict the pixels of the masked patches.

        Args:
            images: ``(B, C, H, W)`` at the encoder's image size.
            idx_keep, idx_mask: From :meth:`random_mask`.

        Returns:
            ``(B, M, patch_size**2 * in_chans)``, in :func:`~lightly.models.utils.patchify`'s pixel order.
        """
        if tuple(images.shape[-2:]) != self.image_size:
            raise ValueError(f"MAE inputs must be {self.image_size[0]}x{self.image_size[1]} (the encoder's image "
                             f"size, on which the masks are laid out), got {images.shape[-2]}x{images.shape[-1]}")
        encoded = self.backbone.encode(images, idx_keep=idx_keep)  # (B, K, D): kept tokens only
        tokens = self.decoder_embed(encoded)
        sequence = repeat_token(self.decoder.mask_token, (images.shape[0], self.sequence_length))
        sequence = set_at_index(sequence, idx_keep, tokens.type_as(sequence))
        decoded = self.decoder(sequence)  # position embedding, blocks, norm
        return self.decoder_pred(get_at_index(decoded, idx_mask))

    def patch_targets(self, images: Tensor, idx_mask: Tensor) -> Tensor:
        """The true pixels of the masked patches, ``(B, M, patch_size**2 * C)``, matching :meth:`forward`'s
        output (``idx_mask`` counts the class token, patches start at index 1)."""
        patches = patchify(images, self.patch_size)
        return get_at_index(patches, idx_mask - self.encoder.num_prefix_tokens)


@dataclass
class MAESchedules:
    """Every per-iteration schedule of an MAE run, precomputed and indexed by the global step."""

    lr: np.ndarray
    weight_decay: np.ndarray

    @classmethod
    def build(cls, optim: Mapping[str, Any], epochs: int, iters_per_epoch: int,
              global_batch: int) -> "MAESchedules":
        """From the ``optim`` config section: linear warm-up over ``warmup_epochs`` to ``lr * global_batch / 256``
        (MAE's base-lr rule), then a cosine to ``min_lr``; the weight decay follows a cosine from ``weight_decay``
        to ``weight_decay_end`` (equal in MAE's recipe: constant)."""
        total = int(epochs) * int(iters_per_epoch)
        lr = cosine_schedule(float(optim["lr"]) * global_batch / 256.0, float(optim["min_lr"]), total,
                             int(round(float(optim["warmup_epochs"]) * iters_per_epoch)))
        wd = float(optim["weight_decay"])
        weight_decay = cosine_schedule(wd, float(optim.get("weight_decay_end", wd)), total)
        return cls(lr=lr, weight_decay=weight_decay)

    def __len__(self) -> int:
        return len(self.lr)
