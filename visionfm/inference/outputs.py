"""Outputs of a command written all at once: nothing already in the output folder is overwritten half.

A command that applies a model to a folder writes every file into a hidden staging folder inside its output
folder and moves them into place (one ``os.replace`` each) only after the last image went through. A bad file,
a wrong checkpoint or an interrupt therefore leaves earlier results untouched, not half replaced.
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, List, Optional, Sequence

__all__ = ["StagedOutput", "write_csv"]

log = logging.getLogger(__name__)


class StagedOutput:
    """Context manager staging a command's files; see the module docstring.

    Example:
        >>> with StagedOutput("runs/embed") as out:  # doctest: +SKIP
        ...     np.save(out.path("embeddings.npy"), features)
    """

    def __init__(self, output: "str | os.PathLike") -> None:
        self.output = Path(output)
        self.stage: Optional[Path] = None
        self.written: List[Path] = []

    def __enter__(self) -> "StagedOutput":
        if self.output.exists() and not self.output.is_dir():
            raise NotADirectoryError(f"{self.output}: exists and is not a folder")
        self.output.mkdir(parents=True, exist_ok=True)
        self.stage = Path(tempfile.mkdtemp(prefix=".partial-", dir=self.output))
        return self

    @property
    def folder(self) -> Path:
        """The staging folder (files written here end up directly in the output folder)."""
        if self.stage is None:
            raise RuntimeError("StagedOutput.folder outside the with-block")
        return self.stage

    def path(self, relative: "str | os.PathLike") -> Path:
        """Where to write ``relative`` now (inside the staging folder); its parent folders are created."""
        if self.stage is None:
            raise RuntimeError("StagedOutput.path() outside the with-block")
        target = self.stage / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self.stage is not None
        try:
            if exc_type is None:
                for source in sorted(p for p in self.stage.rglob("*") if p.is_file()):
                    target = self.output / source.relative_to(self.stage)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(source, target)
                    self.written.append(target)
            else:
                log.warning("nothing written to %s: the command stopped before its end (earlier files there are "
                            "left as they were)", self.output)
        finally:
            shutil.rmtree(self.stage, ignore_errors=True)
            self.stage = None


def write_csv(path: "str | os.PathLike", header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
    """Write a CSV table (floats with 6 significant digits)."""
    path = Path(path)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(list(header))
        for row in rows:
            writer.writerow([f"{v:.6g}" if isinstance(v, float) else v for v in row])
    return path
