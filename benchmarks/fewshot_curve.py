#!/usr/bin/env python
"""Few-shot data-efficiency curve: test AUROC (kappa for DR grades) against training images per class.

Takes every option of ``downstream/cls.py`` plus ``--shots-list``, ``--repeats`` and ``--compare-random-init``,
and prints a Markdown table; the runs and ``fewshot.json`` go under ``--output``. Example::

    python benchmarks/fewshot_curve.py --dataset OCT_DME --modality oct --mode linear \\
        --data-root ../shared/data --shots-list 1,5,10,20 --repeats 5 --compare-random-init --output runs/fewshot
"""

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from visionfm.tasks.classification.cli import build_parser, config_from_args  # noqa: E402


def main(argv=None) -> int:
    parser = build_parser(prog="benchmarks/fewshot_curve.py")
    parser.set_defaults(output="runs/fewshot")
    parser.add_argument("--shots-list", default="1,5,10,20", metavar="K1,K2,...",
                        help="training images per class, comma-separated")
    parser.add_argument("--repeats", type=int, default=3, help="seeds (different images drawn) per shot count")
    parser.add_argument("--compare-random-init", action="store_true",
                        help="also run a randomly initialised encoder of the same shape and input size")
    parser.add_argument("--no-full", action="store_true", help="leave out the run on the whole training split")
    parser.add_argument("--bootstrap", type=int, default=None, help="bootstrap resamples per run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        shots = [int(k) for k in args.shots_list.split(",") if k.strip()]
    except ValueError:
        print(f"error: --shots-list must be comma-separated integers, got {args.shots_list!r}", file=sys.stderr)
        return 2
    cfg = config_from_args(args)

    from visionfm.data.io import ImageReadError
    from visionfm.data.unlabeled import DataError
    from visionfm.tasks.classification.fewshot import fewshot_curve, format_table

    try:
        result = fewshot_curve(cfg, args.output, shots, args.repeats, args.compare_random_init,
                               include_full=not args.no_full, n_bootstrap=args.bootstrap)
    except (DataError, ImageReadError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(format_table(result))
    print(f"curve: {Path(args.output) / 'fewshot.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
