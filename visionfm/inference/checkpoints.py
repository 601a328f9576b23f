"""Which command wrote a checkpoint, so that ``predict`` given the wrong one says so in one line.

``downstream/cls.py predict --checkpoint runs/det/best.pth`` should answer "a detection checkpoint (written by
downstream/det.py), not a classification one", not fail deep inside ``load_state_dict`` with a list of keys.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping

from ..errors import VisionFMError

log = logging.getLogger(__name__)

__all__ = ["WrongCheckpointError", "checkpoint_kind", "require_checkpoint", "load_task_checkpoint", "COMMANDS"]

#: The command that writes each kind of checkpoint (for the error message).
COMMANDS = {
    "classification": "downstream/cls.py --mode finetune (model.pt) or --mode linear (head.pt)",
    "classification-training-state": "downstream/cls.py --mode finetune (finetune_state.pt, the resumable "
                                     "training state)",
    "segmentation": "downstream/seg.py (best.pth)",
    "detection": "downstream/det.py (best.pth)",
    "detection-training-state": "downstream/det.py (last.pth, the resumable training state)",
    "pretraining": "pretrain/dino.py or pretrain/mae.py",
    "encoder": "python -m visionfm.weights convert or pretrain/*.py --export-to",
}


class WrongCheckpointError(VisionFMError, ValueError):
    """A checkpoint of another task (or none of ours) was given; the message names the file and what it is."""


def _has_prefix(state: Any, prefix: str) -> bool:
    return isinstance(state, Mapping) and any(str(k).startswith(prefix) for k in state)


def checkpoint_kind(ckpt: Any) -> str:
    """Name the kind of a checkpoint read with ``safe_load``: ``classification``,
    ``classification-training-state``, ``segmentation``, ``detection``, ``detection-training-state``,
    ``pretraining``, ``encoder`` or ``unknown``."""
    if not isinstance(ckpt, Mapping):
        return "unknown"
    task = ckpt.get("task")
    if isinstance(task, str) and task in COMMANDS:
        return task
    fmt = str(ckpt.get("format", ""))
    if fmt.startswith("visionfm-seg"):
        return "segmentation"
    if fmt.startswith("visionfm-cls-finetune-state"):
        return "classification-training-state"
    if fmt.startswith("visionfm-det-train"):
        return "detection-training-state"
    if "class_names" in ckpt and ("model" in ckpt or "head" in ckpt):
        return "classification"
    model = ckpt.get("model")
    if "classes" in ckpt and _has_prefix(model, "backbone.") and (_has_prefix(model, "bbox_head.")
                                                                  or _has_prefix(model, "rpn_head.")):
        return "detection"
    if _has_prefix(model, "backbone.") and _has_prefix(model, "decode_head."):
        return "segmentation"
    if any(k in ckpt for k in ("teacher", "student")) or fmt.startswith("visionfm-dino") or fmt.startswith(
            "visionfm-mae"):
        return "pretraining"
    if "pos_embed" in ckpt and "patch_embed.proj.weight" in ckpt:
        return "encoder"
    return "unknown"


def require_checkpoint(ckpt: Any, path: "str | os.PathLike", expected: str) -> None:
    """Raise :class:`WrongCheckpointError` unless ``ckpt`` is of kind ``expected``."""
    kind = checkpoint_kind(ckpt)
    if kind == expected:
        return
    if kind == "unknown":
        keys = sorted(map(str, ckpt))[:8] if isinstance(ckpt, Mapping) else type(ckpt).__name__
        what = f"not a checkpoint written by this toolkit (entries: {keys})"
    else:
        what = f"a {kind.replace('-', ' ')} checkpoint (written by {COMMANDS[kind]})"
    raise WrongCheckpointError(f"{path}: {what}, but a {expected} checkpoint is needed (written by "
                               f"{COMMANDS[expected]})")


def load_task_checkpoint(path: "str | os.PathLike", expected: str) -> Any:
    """Read a task checkpoint safely (``weights_only``) and check that it is of kind ``expected``.

    Raises:
        WrongCheckpointError: an encoder weights file (``.safetensors``) or another task's checkpoint.
        FileNotFoundError, UnsafeCheckpointError: as :func:`visionfm.engine.checkpoint.safe_load`.
    """
    from pathlib import Path  # noqa: PLC0415

    from ..engine.checkpoint import safe_load  # noqa: PLC0415

    path = Path(path)
    if path.suffix == ".safetensors":
        raise WrongCheckpointError(f"{path}: encoder (or CLIP) weights, not a trained {expected} model; train one "
                                   f"with {COMMANDS[expected]}, or use downstream/embed.py for the encoder's features")
    ckpt = safe_load(path)
    kind = checkpoint_kind(ckpt)
    # A finished run's folder holds both its trained model and the training state it could resume from; given
    # the state, the model trained in the same run is what the user means (said in the log).
    final = {"classification-training-state": "model.pt", "detection-training-state": "best.pth"}.get(kind)
    if final and kind.startswith(expected) and (path.parent / final).is_file():
        log.info("%s is the resumable training state of its run; using the run's trained model %s", path,
                 path.parent / final)
        path = path.parent / final
        ckpt = safe_load(path)
    require_checkpoint(ckpt, path, expected)
    return ckpt
