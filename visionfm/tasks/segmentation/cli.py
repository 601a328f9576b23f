"""``python downstream/seg.py``: train + test a segmentation head on a modality encoder, ``--eval-only`` a
checkpoint, or ``predict`` masks for a folder of images (the CLI's logic lives here)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from typing import List, Optional

from ...cli import HelpFormatter, add_common_arguments, output_folder, positive_int, resolve_data_root, resolve_device
from ...config import CONFIG_DIR, ConfigError, build_config

__all__ = ["build_parser", "build_predict_parser", "main"]

DEFAULT_CONFIG = CONFIG_DIR / "seg" / "default.yaml"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="downstream/seg.py",
        description="Segmentation on a pretrained modality encoder with mmsegmentation heads. Trains on the "
                    "dataset's training split (a validation split carved from it picks best.pth), then evaluates "
                    "on its test split at the original resolution inside the FOV (Dice, IoU, AUC, sensitivity, "
                    "specificity, accuracy): metrics.json, metrics.csv, overlays/, tensorboard/. "
                    "'downstream/seg.py predict --help' writes masks for a folder of new images.",
        formatter_class=HelpFormatter)
    parser.add_argument("--dataset", default=None,
                        help="DRIVE, CHASE_DB1, HRF, STARE, IDRiD (under --data-root), or a folder with images/ + "
                             "masks/ (default from the config: DRIVE)")
    parser.add_argument("--target", default=None, help="IDRiD structure: MA, HE, EX, SE or OD")
    parser.add_argument("--modality", default=None, help="encoder modality (default cfp)")
    parser.add_argument("--weights", default=None, metavar="PATH",
                        help="encoder weights (default weights/<modality>_<arch>.safetensors)")
    parser.add_argument("--random-init", action="store_true", default=None,
                        help="baseline: the same encoder architecture, randomly initialised")
    parser.add_argument("--arch", default=None, help="encoder architecture to request (vit_tiny, ...)")
    parser.add_argument("--head", default=None, help="decode head shortcut: unetr, uper or fcn")
    tune = parser.add_mutually_exclusive_group()
    tune.add_argument("--freeze-encoder", dest="freeze", action="store_true", default=None,
                      help="train only neck and head (decoder probe)")
    tune.add_argument("--finetune", dest="freeze", action="store_false",
                      help="fine-tune the encoder too, with layer-wise lr decay (optim.layer_decay)")
    parser.add_argument("--steps", type=int, default=None, help="training steps")
    parser.add_argument("--batch-size", type=int, default=None, help="crops per step")
    parser.add_argument("--crop-size", type=int, default=None, help="training crop / sliding window size in pixels")
    parser.add_argument("--lr", type=float, default=None, help="learning rate of neck and head")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default=None)
    parser.add_argument("--eval-only", action="store_true", help="evaluate --checkpoint on the test split, no training")
    parser.add_argument("--checkpoint", default=None, metavar="PATH", help="a best.pth written by this script")
    add_common_arguments(parser, default_output="runs/seg")
    return parser


def build_predict_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="downstream/seg.py predict",
        description="Write predicted masks (<output>/<stem>.png, 0/255) for every image in a folder, with the "
                    "model, working resolution and sliding window stored in a checkpoint.",
        formatter_class=HelpFormatter)
    parser.add_argument("--checkpoint", required=True, metavar="PATH", help="a best.pth written by downstream/seg.py")
    parser.add_argument("--images", required=True, metavar="DIR|CSV",
                        help="folder of images, or a CSV with a 'path' column (relative to the CSV's folder)")
    parser.add_argument("--skip-corrupt", action="store_true",
                        help="leave unreadable files out (counted in the log) instead of stopping with an error")
    parser.add_argument("--output", default="runs/seg_predict", metavar="DIR", type=output_folder,
                        help="folder for the masks")
    parser.add_argument("--probabilities", action="store_true", help="also write <stem>_prob.png probability maps")
    parser.add_argument("--threshold", type=float, default=None,
                        help="foreground probability threshold (default: the one chosen on validation and stored in "
                             "the checkpoint by test.threshold=val, else 0.5)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N")
    parser.add_argument("--limit", type=positive_int, default=None, metavar="N", help="at most N images")
    return parser


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stdout)
    logging.getLogger("mmengine").setLevel(logging.WARNING)
    # mmseg's own BaseDecodeHead calls its deprecated build_loss: nothing a user can act on.
    warnings.filterwarnings("ignore", message="``build_loss`` would be deprecated")


def _errors():
    """Exceptions that are the user's input problems: printed as one clear line, exit status 1."""
    from ...data.datasets.generic_seg import DatasetNotFoundError
    from ...data.io import ImageReadError
    from ...engine.checkpoint import UnsafeCheckpointError
    from ...weights.loader import WeightsNotFoundError
    from .runner import NonFiniteLossError

    return (DatasetNotFoundError, ImageReadError, UnsafeCheckpointError, WeightsNotFoundError, NonFiniteLossError,
            FileNotFoundError, ValueError)


def _predict(argv: List[str]) -> int:
    args = build_predict_parser().parse_args(argv)
    _setup_logging()
    cfg = build_config(DEFAULT_CONFIG, None, {"test.threshold": "val" if args.threshold is None else args.threshold})
    from .runner import predict_folder

    try:
        written = predict_folder(args.checkpoint, args.images, args.output, cfg, resolve_device(args.device),
                                 args.limit, args.probabilities, skip_corrupt=args.skip_corrupt)
    except _errors() as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps({"masks": len(written), "output": str(args.output)}))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["predict"]:
        return _predict(argv[1:])
    args = build_parser().parse_args(argv)
    _setup_logging()
    if args.eval_only and not args.checkpoint:
        print("error: --eval-only needs --checkpoint PATH", file=sys.stderr)
        return 2
    flags = {
        "dataset": args.dataset, "target": args.target, "modality": args.modality, "model.weights": args.weights,
        "model.random_init": args.random_init, "model.arch": args.arch, "model.head": args.head,
        "model.freeze_encoder": args.freeze, "optim.steps": args.steps, "optim.batch_size": args.batch_size,
        "data.crop_size": args.crop_size, "optim.lr": args.lr, "train.precision": args.precision,
        "train.seed": args.seed, "train.device": args.device, "train.max_steps": args.max_steps,
        "data.limit": args.limit,
    }
    try:
        cfg = build_config(DEFAULT_CONFIG, args.config, flags, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from ...modalities import UnknownModalityError, get_modality

    try:
        cfg["modality"] = get_modality(cfg["modality"]).name
    except UnknownModalityError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # Imported here so that --help and config errors answer without loading torch and mmseg.
    from ...engine.distributed import is_main_process
    from .runner import evaluate_checkpoint, train

    data_root = resolve_data_root(args.data_root)
    try:
        device = resolve_device(cfg["train"]["device"])
        if args.eval_only:
            result = evaluate_checkpoint(cfg, args.checkpoint, args.output, data_root, device)
        else:
            result = train(cfg, args.output, data_root, device)
    except _errors() as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if is_main_process():  # under torchrun every rank returns the result; one prints it
        print(json.dumps({"output": str(args.output), "pooled": result["pooled"], "mean": result["mean"]}))
    return 0
