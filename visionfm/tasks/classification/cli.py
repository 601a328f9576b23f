"""``python downstream/cls.py``: disease classification with a modality encoder (the CLI's logic lives here)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Dict, List, Optional

from ...cli import HelpFormatter, add_common_arguments
from ...config import CONFIG_DIR, ConfigError, build_config
from ...modalities import MODALITIES, UnknownModalityError, get_modality

__all__ = ["build_parser", "build_predict_parser", "config_from_args", "main"]


def build_parser(prog: str = "downstream/cls.py") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Classify images with a modality's encoder: a linear (or MLP) probe on frozen features, "
                    "weighted k-NN, or full fine-tuning. Model selection uses the validation split only; the test "
                    "split is evaluated once at the end. Writes <output>/metrics.json (metrics over the whole split "
                    "with bootstrap confidence intervals), confusion_matrix.png, roc_curves.png, "
                    "predictions_test.csv and TensorBoard logs. --eval-only --checkpoint scores a saved model "
                    "without training; 'downstream/cls.py predict --help' applies one to a folder of new images.",
        formatter_class=HelpFormatter)
    parser.add_argument("--dataset", default=None,
                        help="OCT_DME (the OCT/fundus DME-DR set under --data-root), EyeDisease4 (4 fundus classes; "
                             "its 'test' is a 20 %% carve of train/, the real test split being held back), "
                             "imagefolder (--data-root DIR with train/ val/ test/ class folders) or csv (--csv FILE) "
                             "[config: dataset]")
    parser.add_argument("--modality", default=None,
                        help=f"imaging modality, one of {', '.join(MODALITIES)}; OCT_DME: oct (B-scans) or cfp "
                             "(fundus photographs) [config: modality]")
    parser.add_argument("--mode", choices=["linear", "finetune", "knn"], default=None,
                        help="linear: head on frozen features; finetune: whole encoder; knn: weighted k-NN")
    parser.add_argument("--head", choices=["linear", "mlp"], default=None, help="head for linear/finetune modes")
    parser.add_argument("--task", default=None, help="OCT_DME target: dme (yes/no) or dr (grade, ordinal)")
    parser.add_argument("--label-type", choices=["multiclass", "multilabel", "ordinal"], default=None,
                        help="label kind (default: the dataset's own; csv: multilabel when --label-columns is given)")
    parser.add_argument("--csv", metavar="FILE", default=None, help="--dataset csv: the CSV of image paths and labels")
    parser.add_argument("--label-columns", metavar="A,B,C", default=None,
                        help="--dataset csv: 0/1 label columns of a multi-label CSV")
    parser.add_argument("--shots", type=int, default=None, metavar="K",
                        help="few-shot: sample K training images per class (seeded by --seed)")
    parser.add_argument("--weights", metavar="PATH", default=None,
                        help="encoder weights (default: weights/<modality>_<arch>.safetensors)")
    parser.add_argument("--random-init", action="store_true", default=None,
                        help="randomly initialised encoder (baseline for the pretrained one), with the shape and "
                             "input size of --weights or of the modality's default weights when present")
    parser.add_argument("--arch", default=None, help="encoder architecture (checked against the weights file)")
    parser.add_argument("--img-size", type=int, default=None, help="input size (default: the encoder's)")
    parser.add_argument("--pool", choices=["cls", "mean", "cls+mean"], default=None, help="token pooling")
    parser.add_argument("--last-blocks", type=int, default=None, metavar="K",
                        help="frozen features: concatenate the pooled tokens of the last K blocks")
    parser.add_argument("--epochs", type=int, default=None, help="epochs of the probe or of fine-tuning")
    parser.add_argument("--lr", type=float, default=None, help="learning rate of the probe or of fine-tuning")
    parser.add_argument("--batch-size", type=int, default=None, help="fine-tuning batch size")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default=None,
                        help="autocast: auto = bf16 where the CPU/GPU has it")
    parser.add_argument("--eval-only", action="store_true",
                        help="no training: score --checkpoint on the dataset's validation and test splits")
    parser.add_argument("--checkpoint", default=None, metavar="PATH",
                        help="--eval-only: a model.pt (fine-tuning) or head.pt (probe) written by this script")
    add_common_arguments(parser, default_output="runs/cls")
    return parser


def build_predict_parser() -> argparse.ArgumentParser:
    """``downstream/cls.py predict``: probabilities per class and the predicted class of new images."""
    from ...cli import output_folder, positive_int  # noqa: PLC0415
    from ...inference.embed_cli import add_input_arguments  # noqa: PLC0415

    parser = argparse.ArgumentParser(
        prog="downstream/cls.py predict",
        description="Apply a trained classifier to a folder (or CSV) of images: <output>/predictions.csv with the "
                    "path, the predicted class and the probability of every class per image. Images are read as the "
                    "classifier's training images were (modality, size, normalisation stored in the checkpoint).",
        formatter_class=HelpFormatter)
    parser.add_argument("--checkpoint", required=True, metavar="PATH",
                        help="model.pt (--mode finetune) or head.pt (--mode linear) written by downstream/cls.py")
    parser.add_argument("--output", default="runs/cls_predict", metavar="DIR", type=output_folder,
                        help="folder for predictions.csv")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="images per forward pass")
    add_input_arguments(parser)
    return parser


def _predict(argv: List[str]) -> int:
    args = build_predict_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stdout)
    from ...cli import resolve_device  # noqa: PLC0415
    from .predict import predict_folder  # noqa: PLC0415

    path = predict_folder(args.checkpoint, args.images, args.output, resolve_device(args.device), args.limit,
                          args.skip_corrupt, args.recursive, args.batch_size)
    print(json.dumps({"predictions": str(path)}))
    return 0


def config_from_args(args: argparse.Namespace) -> Dict[str, Any]:
    """Merge ``configs/cls/default.yaml``, ``--config``, the flags and ``--set`` overrides."""
    flags = {
        "dataset": args.dataset, "modality": args.modality, "mode": args.mode, "task": args.task,
        "data.root": args.data_root, "data.csv": args.csv, "data.label_type": args.label_type,
        "data.label_columns": args.label_columns, "data.shots": args.shots, "data.limit": args.limit,
        "data.img_size": args.img_size,
        "model.weights": args.weights, "model.random_init": args.random_init, "model.arch": args.arch,
        "model.head": args.head, "model.pool": args.pool, "model.last_blocks": args.last_blocks,
        "train.seed": args.seed, "train.device": args.device, "train.precision": args.precision,
        "train.max_steps": args.max_steps,
    }
    cfg = build_config(CONFIG_DIR / "cls" / "default.yaml", args.config, flags, [])
    # --epochs/--lr/--batch-size belong to the section of the mode finally chosen.
    section = "finetune" if cfg["mode"] == "finetune" else "linear"
    extra = {f"{section}.epochs": args.epochs, f"{section}.lr": args.lr}
    if args.batch_size is not None:
        extra["finetune.batch_size"] = args.batch_size
    cfg = build_config(CONFIG_DIR / "cls" / "default.yaml", args.config, {**flags, **extra}, args.overrides)
    if cfg.get("dataset", "").lower() == "csv" and args.data_root and not cfg["data"].get("image_root"):
        cfg["data"]["image_root"] = args.data_root  # for a CSV, --data-root is where its relative paths start
    return cfg


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["predict"]:
        return _predict(argv[1:])
    args = build_parser().parse_args(argv)
    if args.eval_only and not args.checkpoint:
        print("error: --eval-only needs --checkpoint PATH", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stdout)
    try:
        cfg = config_from_args(args)
        cfg["modality"] = get_modality(cfg["modality"]).name
    except (ConfigError, UnknownModalityError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # Imported here so that --help and config errors answer without loading torch.
    from ...data.io import ImageReadError
    from ...data.unlabeled import DataError
    from ...engine.checkpoint import UnsafeCheckpointError
    from .runner import run_classification

    try:
        if args.eval_only:
            from .runner import evaluate_checkpoint  # noqa: PLC0415

            summary = evaluate_checkpoint(cfg, args.checkpoint, args.output)
        else:
            summary = run_classification(cfg, args.output)
    except (DataError, ImageReadError, FileNotFoundError, ValueError, FloatingPointError,
            UnsafeCheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    from ...engine.distributed import is_main_process  # noqa: PLC0415

    if not is_main_process():  # under torchrun every rank has the summary; one prints it
        return 0
    test = summary["test"]
    brief = {k: test.get(k) for k in ("auroc", "aupr", "accuracy", "balanced_accuracy", "f1_macro", "kappa")
             if k in test}
    print(json.dumps({"test": brief, "ci": {k: test.get("ci", {}).get(k) for k in brief},
                      "selection": {k: v for k, v in summary["selection"].items()
                                    if k not in ("candidates", "history")}}, default=str))
    print(f"metrics: {args.output}/metrics.json")
    return 0
