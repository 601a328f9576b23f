#!/usr/bin/env python
"""Detection heads (mmdet RetinaNet / FCOS / Faster R-CNN) on a VisionFM encoder. See ``--help``; the logic is in
``visionfm.tasks.detection.cli`` and ``.runner``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from visionfm.errors import run_cli  # noqa: E402
from visionfm.tasks.detection.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_cli(main))
