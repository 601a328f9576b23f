"""EyeDisease4: colour fundus photographs of four classes (cataract, diabetic_retinopathy, glaucoma, normal),
folder ``EyeDisease4`` in ImageFolder layout with a ``train/`` split only (its test split is held back).

Layout::

    EyeDisease4/
      train/cataract/0_left.jpg  train/diabetic_retinopathy/10007_left.jpeg  train/glaucoma/...  train/normal/...

Because no validation or test split ships, :func:`read_eyedisease4` carves them from ``train/`` with a fixed
seed, stratified by class and grouped by patient: ``<id>_left`` and ``<id>_right`` of one source (ODIR-5K's
``.jpg``, EyePACS's ``.jpeg``) are the two eyes of one person and always land in the same part, so a model is
never scored on the other eye of a training patient. Files without that pattern are their own group.

The carve fills the three splits every classification reader returns (:class:`LabeledSplits`):

* ``test``: the **evaluation** part (``eval_fraction``, default 20 % of the images), the figures to report. It
  is a validation split of EyeDisease4, *not* its held-back test split; nothing is ever selected on it;
* ``val``: the **selection** part (``selection_fraction``, default 15 %), for probe weight decay, epoch, k of
  k-NN;
* ``train``: the rest (65 %).

The evaluation part depends only on ``seed`` and ``eval_fraction``, not on ``selection_fraction``.

Example:
    >>> splits = read_eyedisease4("../shared/data")  # doctest: +SKIP
    >>> splits.class_names  # doctest: +SKIP
    ['cataract', 'diabetic_retinopathy', 'glaucoma', 'normal']
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import List, Optional

from ..io import is_image_file
from ..unlabeled import DataError
from .labeled import LabeledSample, LabeledSplits, grouped_split, own_group

__all__ = ["FOLDER", "CLASSES", "patient_of", "read_eyedisease4"]

FOLDER = "EyeDisease4"
#: The class folders of the release, in index order.
CLASSES = ("cataract", "diabetic_retinopathy", "glaucoma", "normal")
_EYE = re.compile(r"^(?P<patient>\d+)_(?:left|right)$", re.IGNORECASE)


def patient_of(path: "str | Path") -> Optional[str]:
    """The patient id of ``<id>_left|right.<ext>``, prefixed with the extension (it tells the source apart:
    ODIR-5K ``.jpg`` and EyePACS ``.jpeg`` number their patients independently); ``None`` for other names."""
    path = Path(path)
    match = _EYE.match(path.stem)
    return f"{path.suffix.lower().lstrip('.')}:{match['patient']}" if match else None


def _layout_help(root: Path) -> str:
    return (f"expected {root / FOLDER}/train/<class>/<image> with class folders {', '.join(CLASSES)}; put the "
            f"dataset there or pass --data-root")


def read_eyedisease4(data_root: "str | Path", eval_fraction: float = 0.2, selection_fraction: float = 0.15,
                     seed: int = 0) -> LabeledSplits:
    """Read ``EyeDisease4/train`` and carve the evaluation and selection splits (see the module docstring).

    Args:
        data_root: Folder holding ``EyeDisease4``.
        eval_fraction: Share of the images in the evaluation part (the ``test`` entry).
        selection_fraction: Share in the selection part (the ``val`` entry).
        seed: Seed of the carve; keep it fixed so figures stay comparable across encoders and runs.

    Raises:
        DataError: a missing folder, a class folder without images, or fractions that leave no training data;
            each message names the folder.
    """
    if not (0 < eval_fraction < 1 and 0 < selection_fraction < 1 and eval_fraction + selection_fraction < 1):
        raise DataError(f"EyeDisease4: eval_fraction {eval_fraction} and selection_fraction {selection_fraction} "
                        "must be in (0, 1) and leave images for training")
    root = Path(data_root)
    train_dir = root / FOLDER / "train"
    if not train_dir.is_dir():
        raise DataError(f"dataset EyeDisease4 not found: {train_dir} does not exist; {_layout_help(root)}")
    class_dirs = sorted(p for p in train_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(class_dirs) < 2:
        raise DataError(f"{train_dir}: needs at least 2 class folders, found {[p.name for p in class_dirs]}; "
                        f"{_layout_help(root)}")
    names = [p.name for p in class_dirs]  # alphabetical: the release's folders give the order of CLASSES
    samples: List[LabeledSample] = []
    for index, name in enumerate(names):
        files = sorted(f for f in (train_dir / name).rglob("*") if f.is_file() and is_image_file(f)
                       and not f.name.startswith("."))
        if not files:
            raise DataError(f"{train_dir / name}: class folder holds no images")
        samples.extend(LabeledSample(f, index, patient_of(f) or own_group(f, train_dir)) for f in files)
    carved = grouped_split(samples, (1.0 - eval_fraction - selection_fraction, selection_fraction, eval_fraction),
                           seed)
    notes = [f"no val/ or test/ ships (the test split is held back): carved from {train_dir} by patient, "
             f"stratified by class, seed {seed}: {len(carved['test'])} images ({eval_fraction:.0%}) to evaluate on "
             f"(reported as 'test' here), {len(carved['val'])} ({selection_fraction:.0%}) for model selection, "
             f"{len(carved['train'])} for training"]
    return LabeledSplits(carved, list(names), "multiclass",
                         description=f"EyeDisease4 in {root} (carved evaluation split)", notes=notes)
