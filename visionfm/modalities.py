"""Registry of ophthalmic imaging modalities.

Each modality knows how its images are read (grey or colour), how they are normalised, and which
augmentations are anatomically sensible for it. Encoders always take 3 channels (as VisionFM's do), so grey
modalities are read as one channel and repeated.

Example:
    >>> from visionfm.modalities import get_modality
    >>> get_modality("Fundus").name
    'cfp'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Tuple

from .errors import VisionFMError

__all__ = ["Modality", "AugmentationRecipe", "MODALITIES", "get_modality", "UnknownModalityError"]


class UnknownModalityError(VisionFMError, ValueError):
    """Raised for a modality name that is neither a canonical name nor an alias."""


@dataclass(frozen=True)
class AugmentationRecipe:
    """Which augmentations make sense for a modality (consumed by :mod:`visionfm.data.augment`).

    Attributes:
        hflip: Horizontal flips (left/right eyes mirror each other, so this is safe almost everywhere).
        vflip: Vertical flips; off where up and down carry anatomy (OCT layers, ultrasound depth).
        colour_jitter: Strength of brightness/contrast/saturation jitter (0 disables it).
        hue: Hue jitter; only for colour modalities.
        grayscale_p: Probability of converting a colour crop to grey.
        solarize: Solarisation on the second global crop (as in BYOL/DINO); never on grey modalities,
            where it inverts the meaning of intensity.
        blur: Gaussian blur probability on the first global crop (DINO's asymmetric recipe).
        fov_crops: Crop centres are kept inside the circular field of view (fundus-like images with
            black borders), so crops show retina instead of background.
        square_crop: How a non-square image is made square when it is loaded: ``"center"`` keeps the
            central square (fundus: the circular FOV), ``"stretch"`` resizes the whole frame (B-scans, whose
            edges carry retina).
    """

    hflip: bool = True
    vflip: bool = False
    colour_jitter: float = 0.4
    hue: float = 0.0
    grayscale_p: float = 0.0
    solarize: bool = False
    blur: float = 1.0
    fov_crops: bool = False
    square_crop: str = "center"


@dataclass(frozen=True)
class Modality:
    """An imaging modality.

    Attributes:
        name: Canonical lower-case name (``cfp``, ``oct``...).
        description: Human-readable description.
        channels: Channels of the stored images: 1 (grey, repeated to 3 for the encoder) or 3.
        mean: Per-channel normalisation mean (3 values, applied after grey images are repeated).
        std: Per-channel normalisation std.
        aliases: Other accepted spellings, matched case-insensitively (VisionFM's names included).
        augment: The augmentation recipe.
    """

    name: str
    description: str
    channels: int
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    aliases: Tuple[str, ...] = ()
    augment: AugmentationRecipe = field(default_factory=AugmentationRecipe)

    @property
    def is_grey(self) -> bool:
        return self.channels == 1


def _grey(mean: float, std: float) -> Dict[str, Tuple[float, float, float]]:
    return {"mean": (mean,) * 3, "std": (std,) * 3}


_COLOUR_FUNDUS_AUG = AugmentationRecipe(colour_jitter=0.4, hue=0.02, grayscale_p=0.1, solarize=True,
                                        fov_crops=True, square_crop="center")
_GREY_FUNDUS_AUG = AugmentationRecipe(colour_jitter=0.4, fov_crops=True, square_crop="center")
_BSCAN_AUG = AugmentationRecipe(colour_jitter=0.4, vflip=False, square_crop="stretch")
_PHOTO_AUG = AugmentationRecipe(colour_jitter=0.4, hue=0.05, grayscale_p=0.2, solarize=True)

# The Fundus mean/std are VisionFM's published values; the others are estimates for typical data of the
# modality. Shipped weights carry the normalisation they were trained with in their metadata, which wins.
_MODALITY_LIST = [
    Modality("cfp", "colour fundus photograph", 3, (0.424, 0.261, 0.128), (0.295, 0.202, 0.137),
             ("fundus", "cfp", "colour_fundus", "color_fundus"), _COLOUR_FUNDUS_AUG),
    Modality("oct", "optical coherence tomography B-scan (grey)", 1, **_grey(0.21, 0.18),
             aliases=("OCT", "bscan_oct"), augment=_BSCAN_AUG),
    Modality("octa", "OCT angiography en-face image (grey)", 1, **_grey(0.25, 0.20), aliases=("OCTA",),
             augment=AugmentationRecipe(colour_jitter=0.4, vflip=True, square_crop="center")),
    Modality("ffa", "fluorescein angiography (grey)", 1, **_grey(0.26, 0.20), aliases=("FFA",),
             augment=_GREY_FUNDUS_AUG),
    Modality("faf", "fundus autofluorescence (grey)", 1, **_grey(0.20, 0.16), aliases=("FAF",),
             augment=_GREY_FUNDUS_AUG),
    Modality("icga", "indocyanine green angiography (grey)", 1, **_grey(0.22, 0.18), aliases=("ICGA",),
             augment=_GREY_FUNDUS_AUG),
    Modality("uwf", "ultra-widefield fundus (pseudo-colour)", 3, (0.33, 0.28, 0.12), (0.25, 0.21, 0.12),
             ("UWF", "ultra_widefield"), AugmentationRecipe(colour_jitter=0.4, hue=0.02, fov_crops=True)),
    Modality("slitlamp", "slit-lamp photograph", 3, (0.45, 0.33, 0.28), (0.26, 0.22, 0.21),
             ("SlitLamp", "slit_lamp"), _PHOTO_AUG),
    Modality("external", "external eye photograph", 3, (0.50, 0.39, 0.35), (0.26, 0.23, 0.23),
             ("External", "external_eye"), _PHOTO_AUG),
    Modality("ubm", "ultrasound biomicroscopy (grey)", 1, **_grey(0.15, 0.17), aliases=("UBM",),
             augment=_BSCAN_AUG),
    Modality("bscan", "ocular B-scan ultrasound (grey)", 1, **_grey(0.14, 0.17),
             aliases=("UltraSound", "ultrasound", "us"), augment=_BSCAN_AUG),
    Modality("mri", "orbital MRI slice (grey)", 1, **_grey(0.18, 0.20), aliases=("MRI",),
             augment=AugmentationRecipe(colour_jitter=0.3, square_crop="center")),
]

MODALITIES: Dict[str, Modality] = {m.name: m for m in _MODALITY_LIST}
_LOOKUP: Dict[str, Modality] = {}
for _m in _MODALITY_LIST:
    for _key in (_m.name, *_m.aliases):
        _LOOKUP[_key.lower()] = _m


def get_modality(name: "str | Modality") -> Modality:
    """Return the modality for a canonical name or alias (case-insensitive).

    Raises:
        UnknownModalityError: naming the valid modalities.
    """
    if isinstance(name, Modality):
        return name
    try:
        return _LOOKUP[str(name).strip().lower()]
    except KeyError:
        valid = ", ".join(f"{m.name} ({'/'.join(m.aliases)})" if m.aliases else m.name for m in _MODALITY_LIST)
        raise UnknownModalityError(f"unknown modality {name!r}; valid modalities (aliases): {valid}") from None
