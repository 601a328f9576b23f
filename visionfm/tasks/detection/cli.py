"""``python downstream/det.py``: train + test an mmdet detector on a modality encoder, or ``predict`` boxes for a
folder of images (the CLI's logic lives here; training in :mod:`.runner`).

The run config shares its top-level keys with segmentation and classification: ``dataset`` (a name), ``target``,
``modality`` and ``data.limit`` (``--limit``). The keys of earlier versions (``dataset.name``, ``dataset.target``,
``dataset.<option>``, ``model.modality``) are refused with the new key named (:func:`check_legacy_keys`);
checkpoints written under them are still read (:func:`upgrade_legacy_config`).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from ...cli import HelpFormatter, add_common_arguments, output_folder, positive_int, resolve_data_root, resolve_device
from ...config import CONFIG_DIR, ConfigError, build_config, load_yaml

__all__ = ["DEFAULT_CONFIG", "LEGACY_KEYS", "build_parser", "build_predict_parser", "check_legacy_keys",
           "upgrade_legacy_config", "main"]

DEFAULT_CONFIG = CONFIG_DIR / "det" / "default.yaml"

#: Keys of the detection config before it shared the top-level keys of seg and cls, and where they are now. A key
#: below one of these (``dataset.coco.train_ann``) moved with it (``data.coco.train_ann``).
LEGACY_KEYS: Dict[str, str] = {
    "dataset.name": "dataset", "dataset.target": "target", "model.modality": "modality",
    **{f"dataset.{key}": f"data.{key}" for key in ("source", "val_count", "loc_test_count", "loc_val_count",
                                                    "lesion_merge_gap", "lesion_min_size", "point_box_size",
                                                    "disc_diameter", "coco")},
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="downstream/det.py",
        description="Train an mmdet detector (RetinaNet / FCOS / Faster R-CNN) on a VisionFM encoder; pick the best "
                    "checkpoint on a validation split; report COCO mAP/AP50/AP75 (and point distances) on the test "
                    "split: metrics.json, best.pth, predictions/, tensorboard/. "
                    "'downstream/det.py predict --help' detects on a folder of new images.",
        formatter_class=HelpFormatter)
    parser.add_argument("--dataset", default=None,
                        help="IDRiD or coco (default from the config: IDRiD) [config: dataset]")
    parser.add_argument("--target", default=None, choices=["od", "fovea", "lesions"],
                        help="IDRiD target [config: target]")
    parser.add_argument("--modality", default=None, help="encoder modality (default cfp) [config: modality]")
    parser.add_argument("--weights", default=None, metavar="PATH", help="encoder weights (default weights/<modality>_*)")
    parser.add_argument("--random-init", action="store_true", default=None,
                        help="randomly initialised encoder of the same architecture (baseline)")
    parser.add_argument("--detector", default=None, help="configs/det/<name>.py or an mmdet config path")
    add_common_arguments(parser, default_output="runs/det")
    return parser


def build_predict_parser() -> argparse.ArgumentParser:
    """``downstream/det.py predict``: boxes for a folder of new images with a trained ``best.pth``."""
    from ...inference.embed_cli import add_input_arguments  # noqa: PLC0415

    parser = argparse.ArgumentParser(
        prog="downstream/det.py predict",
        description="Detect with a trained best.pth on every image of a folder (or CSV): <output>/boxes.csv (path, "
                    "class, score, x1 y1 x2 y2 at the image's own resolution), boxes.json (per image) and <name>.png "
                    "with the boxes drawn. Images are resized as in training (data.max_size of the checkpoint).",
        formatter_class=HelpFormatter)
    parser.add_argument("--checkpoint", required=True, metavar="PATH", help="a best.pth written by downstream/det.py")
    parser.add_argument("--output", default="runs/det_predict", metavar="DIR", type=output_folder,
                        help="folder for boxes.csv, boxes.json and the PNGs")
    parser.add_argument("--score-thr", type=float, default=None,
                        help="keep and draw boxes with at least this score (default: the checkpoint's "
                             "eval.draw_score_thr; the top box is always kept for the optic disc and the fovea)")
    parser.add_argument("--batch-size", type=positive_int, default=2, help="images per forward pass")
    add_input_arguments(parser)
    return parser


# ------------------------------------------------------------------------------------------- legacy keys
def legacy_key(dotted: str) -> Optional[str]:
    """The current name of a dotted key of an earlier detection config, or ``None`` for a current key."""
    for old, new in LEGACY_KEYS.items():
        if dotted == old or dotted.startswith(old + "."):
            return new + dotted[len(old):]
    if dotted.startswith("dataset."):  # any other key below the former dataset section
        return "data." + dotted[len("dataset."):]
    return None


def _legacy_in(cfg: Mapping[str, Any]) -> List[Tuple[str, str]]:
    found = []
    if isinstance(cfg.get("dataset"), Mapping):
        def walk(node: Mapping[str, Any], prefix: str) -> None:
            for key, value in node.items():
                dotted = f"{prefix}.{key}"
                if dotted in LEGACY_KEYS or not isinstance(value, Mapping):
                    found.append((dotted, legacy_key(dotted)))
                else:
                    walk(value, dotted)
        walk(cfg["dataset"], "dataset")
    if isinstance(cfg.get("model"), Mapping) and "modality" in cfg["model"]:
        found.append(("model.modality", "modality"))
    return found


def check_legacy_keys(experiment: Optional[Mapping[str, Any]], overrides: Iterable[str] = (),
                      where: str = "the config") -> None:
    """Refuse keys of earlier detection configs in an experiment YAML or ``--set`` overrides, naming the new key.

    Without this, ``model.modality: oct`` would be silently ignored beside the default top-level ``modality``,
    and ``--dataset`` would silently replace an old ``dataset:`` section with everything in it.

    Raises:
        ConfigError: a renamed key is used.
    """
    found = [(f"{where}: ", old, new) for old, new in _legacy_in(experiment or {})]
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        new = legacy_key(key)
        if new is not None:
            found.append(("--set ", key, new))
    if found:
        listing = "; ".join(f"{src}{old!r} is now {new!r}" for src, old, new in found)
        raise ConfigError(f"renamed detection config keys: {listing} (detection shares the top-level dataset, target, "
                          "modality and data.limit of seg and cls; the dataset's options moved under data)")


def upgrade_legacy_config(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """A config of an earlier version (``dataset.name``, ``model.modality``, ...) in the current layout (for
    checkpoints written before the rename); a current config comes back as a copy."""
    cfg = copy.deepcopy(dict(cfg))
    dataset = cfg.get("dataset")
    if isinstance(dataset, Mapping):
        dataset = dict(dataset)
        cfg["dataset"] = dataset.pop("name", "IDRiD")
        cfg["target"] = dataset.pop("target", None)
        cfg["data"] = {**dataset, **(cfg.get("data") or {})}
    model = cfg.get("model")
    if isinstance(model, Mapping) and "modality" in model:
        model = dict(model)
        cfg["modality"] = model.pop("modality")
        cfg["model"] = model
    return cfg


def config_from_args(args: argparse.Namespace) -> Dict[str, Any]:
    """The merged run config: defaults, ``--config``, the flags, ``--set``."""
    experiment = load_yaml(args.config) if args.config else None
    check_legacy_keys(experiment, args.overrides, where=str(args.config))
    flags = {"dataset": args.dataset, "target": args.target, "modality": args.modality,
             "model.weights": args.weights, "model.random_init": args.random_init, "model.detector": args.detector,
             "train.device": args.device, "train.seed": args.seed, "train.max_steps": args.max_steps,
             "data.limit": args.limit}
    cfg = build_config(DEFAULT_CONFIG, args.config, flags, args.overrides)
    from ...modalities import UnknownModalityError, get_modality  # noqa: PLC0415

    try:
        cfg["modality"] = get_modality(cfg["modality"]).name
    except UnknownModalityError as err:
        raise ConfigError(f"modality: {err}") from None
    return cfg


# ------------------------------------------------------------------------------------------------- main
def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")


def _predict(argv: List[str]) -> int:
    args = build_predict_parser().parse_args(argv)
    _setup_logging()
    from .predict import predict_folder  # noqa: PLC0415

    summary = predict_folder(args.checkpoint, args.images, args.output, resolve_device(args.device), args.limit,
                             args.skip_corrupt, args.recursive, args.score_thr, args.batch_size)
    print(json.dumps(summary))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``downstream/det.py`` (errors go through :func:`visionfm.errors.run_cli`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["predict"]:
        return _predict(argv[1:])
    args = build_parser().parse_args(argv)
    _setup_logging()
    cfg = config_from_args(args)
    # Imported here so that --help and config errors answer without loading torch and mmdet.
    from pathlib import Path  # noqa: PLC0415

    from .runner import train  # noqa: PLC0415

    train(cfg, Path(args.output), resolve_data_root(args.data_root))
    return 0
