"""ONNX export of an encoder, checked against PyTorch with onnxruntime.

The exported graph maps normalised images ``(batch, 3, size, size)`` to the pooled class-token feature
``(batch, embed_dim)``, as ``encoder(images)`` does. The batch axis is dynamic; the spatial size is fixed at export
(the position embedding is resized for it once, before tracing). ``onnx`` and ``onnxruntime`` come with the
``onnx`` extra (``pip install -e .[onnx]``; ``scripts/setup.sh`` installs it).
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ..errors import VisionFMError

__all__ = ["OnnxUnavailableError", "export_encoder_onnx", "check_onnx", "check_images"]

log = logging.getLogger(__name__)

INPUT_NAME = "images"
OUTPUT_NAME = "features"


class OnnxUnavailableError(VisionFMError, ImportError):
    """onnx or onnxruntime is not installed."""


def _require(module: str):
    try:
        return __import__(module)
    except ImportError:
        raise OnnxUnavailableError(f"{module} is not installed: pip install -e '.[onnx]' (or: pip install onnx "
                                   f"onnxruntime)") from None


class _Features(nn.Module):
    """The encoder's pooled output (``encoder(images)``), a plain module for the exporter."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images)


def export_encoder_onnx(encoder: nn.Module, output: "str | os.PathLike", img_size: int, opset: int = 17,
                        metadata: Optional[dict] = None) -> Path:
    """Write the encoder as ONNX with a dynamic batch axis (input ``images``, output ``features``).

    Uses the TorchScript-based exporter (``dynamo=False``): it needs neither onnxscript nor network access, and
    its graph of a timm ViT runs in onnxruntime as is. The file is written next to the target and renamed into
    place, so an existing file is only replaced by a complete one.
    """
    _require("onnx")
    output = Path(output)
    if output.suffix != ".onnx":
        raise VisionFMError(f"--output {output}: the file name must end in .onnx")
    output.parent.mkdir(parents=True, exist_ok=True)
    model = _Features(encoder).eval()
    example = torch.zeros(2, 3, int(img_size), int(img_size))
    tmp = output.with_name(output.name + ".tmp")
    with torch.no_grad(), warnings.catch_warnings():
        # timm's position-embedding resize compares sizes in Python: traced as the constant it is at a fixed size.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        # dynamo=False is chosen on purpose (see above); its deprecation notice is not the user's to act on.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(model, (example,), str(tmp), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, opset_version=opset,
                          dynamo=False)
    if metadata:
        import onnx  # noqa: PLC0415

        graph = onnx.load(str(tmp))
        for key, value in metadata.items():
            entry = graph.metadata_props.add()
            entry.key, entry.value = str(key), str(value)
        onnx.save(graph, str(tmp))
    os.replace(tmp, output)
    return output


def check_onnx(path: "str | os.PathLike", encoder: nn.Module, inputs: torch.Tensor) -> Tuple[float, Tuple[int, ...]]:
    """Run the ONNX file with onnxruntime (CPU) and the encoder with PyTorch on the same inputs.

    Returns:
        ``(largest absolute difference, output shape)``.
    """
    ort = _require("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: inputs.numpy().astype(np.float32)})[0]
    with torch.no_grad():
        want = encoder.eval()(inputs).float().numpy()
    if got.shape != want.shape:
        raise VisionFMError(f"{path}: onnxruntime gives shape {got.shape}, PyTorch {want.shape}")
    return float(np.abs(got - want).max()), tuple(got.shape)


def check_images(source: "str | os.PathLike | None", modality: str, img_size: int, patch_size: int,
                 mean: Sequence[float], std: Sequence[float], count: int = 4) -> Tuple[torch.Tensor, str]:
    """The inputs of the check: up to ``count`` images of a folder/CSV read as the encoder reads them, or, without
    one, a fixed random batch of 3 (a batch size other than the one traced, so the dynamic axis is exercised)."""
    if source is None:
        generator = torch.Generator().manual_seed(0)
        return torch.randn(3, 3, img_size, img_size, generator=generator), "3 random normalised images"
    from ..data.encoder_inputs import encoder_batch, prepare_inputs  # noqa: PLC0415

    images = prepare_inputs(source, modality, patch_size, limit=count)
    return encoder_batch(images, modality, img_size, mean, std), f"{len(images)} image(s) of {source}"
