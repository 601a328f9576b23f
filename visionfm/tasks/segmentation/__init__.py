"""Segmentation on mmsegmentation: our ViT as an mmseg backbone, a ViT feature-pyramid neck, a UNETR-like
decode head with a full-resolution convolutional path, vessel metrics, and the train/eval/predict runner.

Importing this package registers ``VisionFMViT`` (backbone), ``VisionFMPyramidNeck`` (neck) and
``VisionFMUNETRHead`` (decode head) in mmseg's ``MODELS`` registry, so any mmseg config can name them::

    import visionfm.tasks.segmentation  # noqa: F401  (registers the modules)
    from mmseg.registry import MODELS
    model = MODELS.build(dict(type="EncoderDecoder", backbone=dict(type="VisionFMViT", modality="cfp"), ...))
"""

from ...models.mm_backbone import VisionFMViT
from .head import VisionFMUNETRHead
from .metrics import BinarySegMetrics, binary_metrics
from .neck import VisionFMPyramidNeck

__all__ = ["VisionFMViT", "VisionFMPyramidNeck", "VisionFMUNETRHead", "BinarySegMetrics", "binary_metrics"]
