"""``python -m visionfm.weights list | verify | convert SRC --modality M``."""

from ..errors import run_cli
from .cli import main

raise SystemExit(run_cli(main))
