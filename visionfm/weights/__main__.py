"""``python -m visionfm.weights list | verify | convert SRC --modality M``."""

from .cli import main

raise SystemExit(main())
