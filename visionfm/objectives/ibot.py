"""iBOT: DINO on the class token plus self-distillation of masked patch tokens (Zhou et al., 2022), the objective
VisionFM trains its encoders with.

The pieces are lightly's: :class:`lightly.loss.IBOTPatchLoss` (the masked-patch cross-entropy with its own centre),
:class:`lightly.loss.KoLeoLoss` (DINOv2's optional spreading term on the class token),
:class:`lightly.models.modules.MaskedVisionTransformerTIMM` (a timm ViT whose masked patch tokens are replaced by a
learnt mask token) and :func:`lightly.models.utils.random_block_mask` (block-wise masks for a share of the images).
This module arranges them as the iBOT paper trains them:

* the student sees its two global crops *masked* (block-wise masks on ``mask_probability`` of the images, each
  masking a ratio drawn from ``mask_ratio``) and its local crops unmasked; the teacher sees the global crops
  unmasked;
* the class-token loss is DINO's (every teacher global view against every other student view);
* the patch loss compares, for each global view, the student's output at its masked positions with the teacher's
  output for the same view at the same positions;
* the patch tokens go through the class-token head (``shared_head``) or a head of their own.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
from lightly.loss import IBOTPatchLoss, KoLeoLoss
from lightly.models.modules import DINOProjectionHead
from lightly.models.modules.masked_vision_transformer_timm import MaskedVisionTransformerTIMM
from lightly.models.utils import random_block_mask
from torch import Tensor, nn

from ..models.vit import cls_features
from .dino import DINOLoss

__all__ = ["MaskConfig", "sample_masks", "IBOTNetwork", "IBOTModel", "IBOTOutputs", "IBOTLoss"]


@dataclass(frozen=True)
class MaskConfig:
    """How the student's global crops are masked (iBOT's defaults: half of the images, 10-50 % of their patches,
    in blocks of at least 4 patches).

    Attributes:
        probability: Share of the images that are masked at all.
        ratio: Range of the share of an image's patches that is masked (each masked image draws from it).
        min_block: Smallest block, in patches.
    """

    probability: float = 0.5
    ratio: Tuple[float, float] = (0.1, 0.5)
    min_block: int = 4

    def __post_init__(self) -> None:
        lo, hi = (float(r) for r in self.ratio)
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"ibot.mask_probability must lie in [0, 1], got {self.probability}")
        if not (0.0 < lo <= hi < 1.0):
            raise ValueError(f"ibot.mask_ratio must be a range [low, high] with 0 < low <= high < 1, got {self.ratio}")
        if self.min_block < 1:
            raise ValueError(f"ibot.min_block must be at least 1 patch, got {self.min_block}")


def sample_masks(batch: int, grid: Tuple[int, int], config: MaskConfig, seed: int) -> Tensor:
    """Block-wise masks ``(batch, H, W)`` (``True`` = masked) from lightly's :func:`random_block_mask`.

    lightly draws from Python's :mod:`random`; its state is set from ``seed`` and restored afterwards, so a step's
    masks are a function of the step's seed only (exact resume) and other users of :mod:`random` are unaffected.
    """
    patches = int(grid[0]) * int(grid[1])
    state = random.getstate()
    random.seed(seed)
    try:
        # Explicit block bounds: lightly's defaults fail on grids with fewer masked patches than one block.
        masks = random_block_mask((batch, *grid), batch_mask_ratio=config.probability,
                                  min_image_mask_ratio=float(config.ratio[0]),
                                  max_image_mask_ratio=float(config.ratio[1]),
                                  min_num_masks_per_block=min(config.min_block, patches),
                                  max_num_masks_per_block=patches)
    finally:
        random.setstate(state)
    return masks


class IBOTNetwork(nn.Module):
    """A ViT backbone with a class-token head and a patch-token head, applied to lists of views.

    ``backbone`` stays the plain timm ViT (its ``state_dict`` is what is exported); the masking runs through lightly's
    :class:`MaskedVisionTransformerTIMM`, which shares the backbone's modules and this network's ``mask_token``
    (it is held outside the module tree so that the checkpoint keeps one copy of each weight).

    Args:
        backbone: timm ``VisionTransformer`` (class token, ``dynamic_img_size``).
        head: Maps ``(N, D)`` to ``(N, K)``.
        patch_head: Head for the patch tokens; ``None`` shares ``head``.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, patch_head: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.patch_head = patch_head
        # iBOT and DINOv2 start the mask token at zero.
        self.mask_token = nn.Parameter(torch.zeros(1, 1, backbone.embed_dim))
        masked = MaskedVisionTransformerTIMM(backbone, mask_token=self.mask_token, weight_initialization="skip",
                                             pos_embed_initialization="skip")
        object.__setattr__(self, "_masked", masked)

    @property
    def patch_projection(self) -> nn.Module:
        return self.head if self.patch_head is None else self.patch_head

    def encode_global(self, views: Sequence[Tensor], masks: Optional[Tensor] = None) -> Tensor:
        """All output tokens ``(V*B, 1 + H*W, D)`` of the global views (one backbone call), with the patches where
        ``masks`` (``(V*B, H, W)``) is ``True`` replaced by the mask token before the first block."""
        images = torch.cat(list(views)) if len(views) > 1 else views[0]
        token_mask = None
        if masks is not None:
            flat = masks.flatten(1)
            token_mask = torch.cat([flat.new_zeros(flat.shape[0], 1), flat], dim=1)  # the class token is never masked
        return self._masked.encode(images, mask=token_mask)

    def forward(self, global_views: Sequence[Tensor], local_views: Sequence[Tensor] = (),
                masks: Optional[Tensor] = None, patch_positions: Optional[Tensor] = None) -> "IBOTOutputs":
        """Head outputs of every view's class token (``(V, B, K)``) and of the patch tokens at ``patch_positions``
        (a boolean ``(Vg*B, H, W)``, default ``masks``) as ``(M, K)`` rows, in row-major order."""
        tokens = self.encode_global(global_views, masks)
        cls = [tokens[:, 0]]
        if local_views:
            start = 0
            while start < len(local_views):  # views of one size go through the backbone together
                end = start + 1
                while end < len(local_views) and local_views[end].shape[-2:] == local_views[start].shape[-2:]:
                    end += 1
                cls.append(cls_features(self.backbone, torch.cat(list(local_views[start:end]))))
                start = end
        cls_tokens = torch.cat(cls)
        out = self.head(cls_tokens)
        n_views = len(global_views) + len(local_views)
        positions = masks if patch_positions is None else patch_positions
        patch_out = None
        if positions is not None:
            patches = tokens[:, 1:][positions.flatten(1)]
            patch_out = self.patch_projection(patches)
        return IBOTOutputs(out.view(n_views, -1, out.shape[-1]), patch_out, tokens[:, 0])


@dataclass
class IBOTOutputs:
    """What one network returns for a step: class-token head outputs ``(V, B, K)``, patch head outputs at the
    masked positions ``(M, K)`` (or ``None``), and the global views' class tokens before the head (for KoLeo)."""

    cls: Tensor
    patches: Optional[Tensor]
    global_cls_tokens: Tensor


class IBOTModel(nn.Module):
    """Student and EMA teacher for iBOT (see the module docstring).

    Args:
        backbone: The encoder.
        embed_dim: Its output width.
        out_dim: Prototypes of the class-token head.
        hidden_dim, bottleneck_dim, norm_last_layer, freeze_last_layer_epochs: Head settings, as for DINO.
        shared_head: The patch tokens use the class-token head; otherwise a head of their own with
            ``patch_out_dim`` prototypes.
        patch_out_dim: Prototypes of a separate patch head (ignored when shared).
    """

    def __init__(self, backbone: nn.Module, embed_dim: int, out_dim: int = 8192, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, norm_last_layer: bool = True, freeze_last_layer_epochs: int = 1,
                 shared_head: bool = True, patch_out_dim: int = 8192) -> None:
        super().__init__()

        def make_head(k: int) -> DINOProjectionHead:
            return DINOProjectionHead(embed_dim, hidden_dim, bottleneck_dim, k,
                                      freeze_last_layer=freeze_last_layer_epochs, norm_last_layer=norm_last_layer)

        def make_network(encoder: nn.Module) -> IBOTNetwork:
            return IBOTNetwork(encoder, make_head(out_dim), None if shared_head else make_head(patch_out_dim))

        self.patch_out_dim = out_dim if shared_head else patch_out_dim
        self.student = make_network(backbone)
        # As for DINO: weight-normalised heads cannot be deep-copied, so the teacher is built fresh and given the
        # student's exact values.
        self.teacher = make_network(copy.deepcopy(backbone))
        self.teacher.load_state_dict(self.student.state_dict())
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self._pairs = list(zip(self.student.parameters(), self.teacher.parameters()))

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """``teacher = momentum * teacher + (1 - momentum) * student`` in one fused multi-tensor op."""
        if momentum >= 1.0:
            return
        torch._foreach_lerp_([t for _, t in self._pairs], [s.detach() for s, _ in self._pairs], 1.0 - momentum)

    def cancel_last_layer_gradients(self, epoch: int) -> None:
        self.student.head.cancel_last_layer_gradients(epoch)
        if self.student.patch_head is not None:
            self.student.patch_head.cancel_last_layer_gradients(epoch)


class IBOTLoss(nn.Module):
    """iBOT's total loss: ``cls_weight * DINO(class tokens) + patch_weight * IBOTPatch(masked patches)
    [+ koleo_weight * KoLeo(student global class tokens)]``.

    Args:
        out_dim: Prototypes of the class-token head.
        patch_out_dim: Prototypes of the patch head.
        student_temp: Student temperature of both terms.
        center_momentum: Momentum of both centres.
        cls_weight, patch_weight, koleo_weight: Term weights.
    """

    def __init__(self, out_dim: int, patch_out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9,
                 cls_weight: float = 1.0, patch_weight: float = 1.0, koleo_weight: float = 0.0) -> None:
        super().__init__()
        self.cls_loss = DINOLoss(out_dim, student_temp=student_temp, center_momentum=center_momentum)
        self.patch_loss = IBOTPatchLoss(patch_out_dim, student_temp=student_temp, center_momentum=center_momentum)
        self.koleo = KoLeoLoss() if koleo_weight > 0 else None
        self.cls_weight, self.patch_weight, self.koleo_weight = float(cls_weight), float(patch_weight), float(koleo_weight)

    def forward(self, teacher: IBOTOutputs, student: IBOTOutputs, masks: Tensor, teacher_temp: float,
                patch_teacher_temp: Optional[float] = None) -> Tuple[Tensor, dict]:
        """Total loss and its terms (as detached tensors) for one step.

        Args:
            teacher, student: The two networks' outputs (the teacher's patches at the student's masked positions).
            masks: ``(Vg*B, H, W)`` masks the student's global views were given.
            teacher_temp: Teacher temperature of the class-token term (and of the patch term unless
                ``patch_teacher_temp`` is given).
        """
        cls = self.cls_loss(teacher.cls, student.cls, teacher_temp=teacher_temp)
        total = self.cls_weight * cls
        terms = {"loss_cls": cls.detach()}
        if student.patches is not None and student.patches.shape[0] > 0:
            temp = teacher_temp if patch_teacher_temp is None else patch_teacher_temp
            patch = self.patch_loss(teacher.patches.detach().float(), student.patches.float(), masks,
                                    teacher_temp=temp)
            total = total + self.patch_weight * patch
            terms["loss_patch"] = patch.detach()
        if self.koleo is not None:
            # DINOv2: KoLeo on each global view's class tokens separately (neighbours within one view's batch).
            views = student.global_cls_tokens.float().chunk(teacher.cls.shape[0])
            koleo = sum(self.koleo(v) for v in views) / len(views)
            total = total + self.koleo_weight * koleo
            terms["loss_koleo"] = koleo.detach()
        return total, terms
