"""VisionFM toolkit: per-modality DINO ViT encoders for ophthalmic imaging, CLIP alignment, and
classification / segmentation (mmseg) / detection (mmdet) heads."""

__version__ = "0.1.0"

from .modalities import MODALITIES, get_modality  # noqa: E402
from .weights.loader import EncoderInfo, load_encoder  # noqa: E402

__all__ = ["MODALITIES", "EncoderInfo", "get_modality", "load_encoder", "__version__"]
