#!/usr/bin/env python
"""Disease classification with a modality encoder (linear probe, k-NN, fine-tuning, few-shot). See ``--help``;
the logic is in ``visionfm.tasks.classification``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from visionfm.errors import run_cli  # noqa: E402
from visionfm.tasks.classification.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_cli(main))
