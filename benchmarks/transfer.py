#!/usr/bin/env python
"""Transfer suite: an encoder against its random-init twin on a fixed set of downstream tasks, one table.

::

    python benchmarks/transfer.py --modality cfp --data-root ../shared/data --json cfp.json
    python benchmarks/transfer.py --modality oct --weights runs/oct/encoder.safetensors --data-root ../shared/data
    python benchmarks/transfer.py --modality cfp --quick --data-root ../shared/data      # smoke test, about a minute

Rows (``visionfm/evaluation/transfer.py`` describes each protocol):

* ``--modality cfp``: EyeDisease4 linear probe and k-NN (balanced accuracy, macro AUROC on a 20 % split carved
  from its training folder by patient, stratified, seed 0; selection on a further 15 % carve), fundus DME linear
  probe (test AUROC, held-out patients of OCT_DME), DRIVE vessels with ``configs/seg/drive_target.yaml`` cut to
  200 steps, no test-time flips (test Dice pooled over images and mean per-image AUC, inside the FOV).
* ``--modality oct``: OCT DME linear probe (test AUROC, held-out patients), 5-shot probe (20 draws, mean ± sd),
  ``configs/cls/oct_dme_finetune.yaml`` cut to 10 epochs at lr 0.01 without drop path (test AUROC).

Columns: pretrained, random init (same architecture, patch size, image size and normalisation, timm's initial
weights drawn with ``--seed``), their difference and its 95 % paired bootstrap interval (1000 resamples of the
test items, both encoders scored on each resample). ``--json FILE`` writes every figure, the choices made on
validation data, run folders and timings.

Budgets (``Budget`` in ``visionfm/evaluation/transfer.py``): the full suite must finish within 30 minutes per
modality on the project's shared 2-core CPU; DRIVE (two trainings) is most of the cfp time. ``--quick`` runs
every code path on a few images (16 per classification split, 2 DRIVE images, 2 training steps, 200 resamples);
its figures mean nothing.
"""

import argparse
import json
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from visionfm.cli import resolve_data_root  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="benchmarks/transfer.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--modality", required=True, help="cfp (fundus) or oct")
    parser.add_argument("--weights", metavar="PATH", default=None,
                        help="encoder weights (safetensors, or any format visionfm.load_encoder reads); default: the "
                             "shipped encoder of the modality in weights/")
    parser.add_argument("--quick", action="store_true", help="smoke test: few images, few steps (about a minute)")
    parser.add_argument("--json", metavar="FILE", default=None, help="write all figures to this JSON file")
    parser.add_argument("--data-root", metavar="DIR", default=None,
                        help="folder holding EyeDisease4, OCT_AND_EYE_FUNDUS_DME_DR and DRIVE (default: "
                             "$VISIONFM_DATA or data/)")
    parser.add_argument("--output", metavar="DIR", default=None,
                        help="folder for the twin's weights and every run folder (default: a temporary folder, "
                             "removed at the end)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the twin's weights, probes, trainings, few-shot draws and bootstrap "
                             "(default 0; dataset splits keep their own fixed seeds)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    return parser


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    logging.getLogger("mmengine").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message="``build_loss`` would be deprecated")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging()
    start = time.perf_counter()
    # Imported here so that --help answers without loading torch and mmseg.
    from visionfm.data.io import ImageReadError
    from visionfm.data.unlabeled import DataError
    from visionfm.evaluation.transfer import FULL, QUICK, format_table, run_transfer_suite
    from visionfm.modalities import UnknownModalityError
    from visionfm.weights import UnsafeCheckpointError

    budget = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory(prefix="visionfm-transfer-") as scratch:
        output = Path(args.output) if args.output else Path(scratch)
        try:
            result = run_transfer_suite(args.modality, args.weights, resolve_data_root(args.data_root), output,
                                        budget, args.seed, args.device)
        except (DataError, ImageReadError, FileNotFoundError, ValueError, UnknownModalityError,
                UnsafeCheckpointError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
    result["quick"] = args.quick
    result["wall_seconds"] = round(time.perf_counter() - start, 1)
    title = f"transfer suite, {result['modality']}{' (--quick: smoke test, figures mean nothing)' if args.quick else ''}"
    print(f"{title}\nencoder: {result['weights']}\n")
    print(format_table(result))
    print(f"\nwall time {result['wall_seconds']:.0f} s")
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"figures: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
