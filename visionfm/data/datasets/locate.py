"""Finding a dataset's folder under ``--data-root`` by its name, also when a copy nested it one level deeper."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from ...errors import VisionFMError

__all__ = ["DatasetNotFoundError", "dataset_folder"]

log = logging.getLogger(__name__)


class DatasetNotFoundError(VisionFMError, FileNotFoundError):
    """A dataset folder that is missing or not in the expected layout."""


def dataset_folder(data_root: "str | Path", folder: str, looks_right: Callable[[Path], bool]) -> Path:
    """``<data_root>/<folder>``, or its one subfolder that has the expected layout when it does not.

    Unzipping an archive into a folder of the same name is a common way to end up with ``DRIVE/DRIVE/training``
    or ``CHASE_DB1/CHASEDB1/...``; the reader then looks one level down and says so in the log. When the folder
    is missing, or neither it nor exactly one subfolder looks right, the folder itself is returned and the
    reader's own check reports the expected layout.

    Args:
        data_root: The folder that holds datasets by their folder names.
        folder: The dataset's folder name (``DRIVE``).
        looks_right: Whether a candidate folder has the dataset's layout (for example holds ``training/``).
    """
    root = Path(data_root) / folder
    if not root.is_dir() or looks_right(root):
        return root
    nested = [c for c in sorted(root.iterdir()) if c.is_dir() and not c.name.startswith(".") and looks_right(c)]
    if len(nested) == 1:
        log.info("dataset %s: %s does not hold the expected layout, but %s does: using it", folder, root, nested[0])
        return nested[0]
    return root
