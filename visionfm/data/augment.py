"""Batched multi-crop augmentation with kornia, run on the training device.

Images arrive as a ``uint8`` batch ``(B, C, H, W)`` (``C`` = 1 for grey modalities, 3 for colour). Crops
are sampled per image (area scale and aspect ratio as torchvision's RandomResizedCrop, with crop centres
kept inside the circular field of view for fundus-like modalities), resized with
:func:`kornia.geometry.transform.crop_and_resize`, and then photometrically augmented with the modality's
recipe. Outputs are normalised 3-channel float tensors.
"""

from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import kornia.augmentation as K
import torch
from kornia.geometry.transform import crop_and_resize
from torch import Tensor, nn

from ..modalities import Modality, get_modality

__all__ = ["sample_crop_boxes", "ViewAugmentation", "MultiCropAugmentation", "MAEAugmentation"]


def sample_crop_boxes(batch: int, height: int, width: int, scale: Tuple[float, float],
                      ratio: Tuple[float, float] = (3 / 4, 4 / 3), fov: bool = False,
                      device: "torch.device | str" = "cpu") -> Tensor:
    """Sample one crop box per image, returned as kornia corner points ``(B, 4, 2)`` in ``(x, y)`` order
    (top-left, top-right, bottom-right, bottom-left).

    Args:
        batch: Number of boxes.
        height, width: Image size.
        scale: Range of the crop's area as a fraction of the image area.
        ratio: Range of the crop's aspect ratio (width / height), sampled log-uniformly.
        fov: Keep the crop centre close enough to the image centre that the crop lies (mostly) inside the
            inscribed circular field of view, instead of on the black background around it.
        device: Device of the returned tensor.
    """
    area = height * width * torch.empty(batch).uniform_(*scale)
    log_ratio = torch.empty(batch).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    aspect = torch.exp(log_ratio)
    w = torch.sqrt(area * aspect).clamp(4, width)
    h = torch.sqrt(area / aspect).clamp(4, height)
    cx = w / 2 + torch.rand(batch) * (width - w)
    cy = h / 2 + torch.rand(batch) * (height - h)
    if fov:
        # Distance from the image centre at which the crop's half-diagonal still fits in the FOV circle.
        radius = 0.5 * min(height, width)
        max_dist = (radius - 0.5 * torch.sqrt(w ** 2 + h ** 2)).clamp(min=0.0)
        dx, dy = cx - width / 2, cy - height / 2
        dist = torch.sqrt(dx ** 2 + dy ** 2).clamp(min=1e-6)
        shrink = torch.clamp(max_dist / dist, max=1.0)
        cx, cy = width / 2 + dx * shrink, height / 2 + dy * shrink
    x0, y0 = cx - w / 2, cy - h / 2
    x1, y1 = x0 + w - 1, y0 + h - 1
    boxes = torch.stack([torch.stack([x0, y0], -1), torch.stack([x1, y0], -1),
                         torch.stack([x1, y1], -1), torch.stack([x0, y1], -1)], dim=1)
    return boxes.to(device)


class ViewAugmentation(nn.Module):
    """One view type (a global or a local crop): random resized crop, flips, photometric changes,
    normalisation.

    Args:
        modality: Modality (or its name) whose recipe and normalisation to use.
        size: Output side length.
        scale: Crop area range.
        blur_p: Probability of Gaussian blur.
        solarize_p: Probability of solarisation (ignored for grey modalities).
        colour: Apply the modality's colour jitter and random greyscale (MAE's view has neither).
    """

    def __init__(self, modality: "Modality | str", size: int, scale: Tuple[float, float],
                 blur_p: float = 0.5, solarize_p: float = 0.0, colour: bool = True) -> None:
        super().__init__()
        self.modality = get_modality(modality)
        recipe = self.modality.augment
        self.size = int(size)
        self.scale = tuple(scale)
        self.fov = recipe.fov_crops
        geometric: List[nn.Module] = []
        if recipe.hflip:
            geometric.append(K.RandomHorizontalFlip())
        if recipe.vflip:
            geometric.append(K.RandomVerticalFlip())
        photometric: List[nn.Module] = []
        s = recipe.colour_jitter if colour else 0.0
        if s > 0:
            if self.modality.is_grey:
                photometric.append(K.ColorJitter(brightness=s, contrast=s, p=0.8))
            else:
                photometric.append(K.ColorJitter(brightness=s, contrast=s, saturation=s / 2, hue=recipe.hue, p=0.8))
        if colour and recipe.grayscale_p > 0 and not self.modality.is_grey:
            photometric.append(K.RandomGrayscale(p=recipe.grayscale_p))
        if blur_p * recipe.blur > 0:
            kernel = max(3, int(0.1 * self.size) // 2 * 2 + 1)
            photometric.append(K.RandomGaussianBlur((kernel, kernel), (0.1, 2.0), p=blur_p * recipe.blur))
        if solarize_p > 0 and recipe.solarize and not self.modality.is_grey:
            photometric.append(K.RandomSolarize(thresholds=0.0, additions=0.0, p=solarize_p))
        self.geometric = nn.Sequential(*geometric)
        self.photometric = nn.Sequential(*photometric)
        self.register_buffer("mean", torch.tensor(self.modality.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.modality.std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        """``images``: float ``(B, C, H, W)`` in ``[0, 1]``; returns normalised ``(B, 3, size, size)``."""
        b, _, h, w = images.shape
        boxes = sample_crop_boxes(b, h, w, self.scale, fov=self.fov, device=images.device)
        views = crop_and_resize(images, boxes.to(images.dtype), (self.size, self.size), align_corners=False)
        views = self.geometric(views)
        # kornia's colour jitter expects 1 or 3 channels; grey images stay grey until the end.
        views = self.photometric(views).clamp_(0.0, 1.0)
        if views.shape[1] == 1:
            views = views.expand(-1, 3, -1, -1)
        return (views - self.mean) / self.std


class MultiCropAugmentation(nn.Module):
    """DINO's multi-crop: two global views (asymmetric blur/solarisation as in the paper) and ``n_local``
    local views.

    Returns ``(global_views, local_views)``: lists of tensors, one per view, each ``(B, 3, S, S)``.

    Example:
        >>> aug = MultiCropAugmentation("oct", global_size=64, local_size=32, n_local=2)
        >>> g, l = aug(torch.randint(0, 255, (4, 1, 80, 80), dtype=torch.uint8))
        >>> len(g), len(l), tuple(g[0].shape), tuple(l[0].shape)
        (2, 2, (4, 3, 64, 64), (4, 3, 32, 32))
    """

    def __init__(self, modality: "Modality | str", global_size: int = 224, local_size: int = 96,
                 n_local: int = 6, global_scale: Sequence[float] = (0.4, 1.0),
                 local_scale: Sequence[float] = (0.05, 0.4)) -> None:
        super().__init__()
        self.global_1 = ViewAugmentation(modality, global_size, tuple(global_scale), blur_p=1.0)
        self.global_2 = ViewAugmentation(modality, global_size, tuple(global_scale), blur_p=0.1, solarize_p=0.2)
        self.local = ViewAugmentation(modality, local_size, tuple(local_scale), blur_p=0.5)
        self.n_local = int(n_local)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tuple[List[Tensor], List[Tensor]]:
        images = images.float().div_(255.0) if images.dtype == torch.uint8 else images
        global_views = [self.global_1(images), self.global_2(images)]
        local_views = [self.local(images) for _ in range(self.n_local)]
        return global_views, local_views


class MAEAugmentation(nn.Module):
    """MAE's single view per image: a random resized crop (area scale ``(0.2, 1.0)`` by default, aspect ratio 3/4 to
    4/3, crop centres kept inside the field of view for fundus-like modalities) and the modality's flips, then
    normalisation. No colour jitter, greyscale, blur or solarisation: MAE and RETFound pretrain with crops and flips
    only (the reconstruction target is the image itself). It is :class:`ViewAugmentation` with its photometric
    changes off.

    Returns one tensor ``(B, 3, size, size)``.

    Example:
        >>> aug = MAEAugmentation("oct", size=32)
        >>> tuple(aug(torch.randint(0, 255, (4, 1, 40, 40), dtype=torch.uint8)).shape)
        (4, 3, 32, 32)
    """

    def __init__(self, modality: "Modality | str", size: int = 224, scale: Sequence[float] = (0.2, 1.0)) -> None:
        super().__init__()
        self.view = ViewAugmentation(modality, size, tuple(scale), blur_p=0.0, solarize_p=0.0, colour=False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """``images``: ``uint8`` ``(B, C, H, W)`` (or float in ``[0, 1]``)."""
        images = images.float().div_(255.0) if images.dtype == torch.uint8 else images
        return self.view(images)
