"""VisionFM toolkit: per-modality DINO ViT encoders for ophthalmic imaging, CLIP alignment, and
classification / segmentation (mmseg) / detection (mmdet) heads."""

__version__ = "0.1.0"

from .modalities import MODALITIES, get_modality  # noqa: E402
from .weights.loader import EncoderInfo, load_encoder  # noqa: E402

__all__ = ["MODALITIES", "CLIPModel", "EncoderInfo", "get_modality", "load_encoder", "__version__"]


def __getattr__(name: str):
    # CLIPModel pulls in the text-encoder stack only when it is used, so ``import visionfm`` stays light.
    if name == "CLIPModel":
        from .models.clip import CLIPModel

        return CLIPModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
