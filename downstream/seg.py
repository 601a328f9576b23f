#!/usr/bin/env python
"""Segmentation heads (mmseg) on a modality encoder. See ``--help``; the logic is in
``visionfm.tasks.segmentation.cli``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from visionfm.errors import run_cli  # noqa: E402
from visionfm.tasks.segmentation.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_cli(main))
