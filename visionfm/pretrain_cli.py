"""``python pretrain/dino.py``: DINO pretraining of one modality's encoder (the CLI's logic lives here)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import List, Optional

from .cli import HelpFormatter, add_common_arguments
from .config import CONFIG_DIR, ConfigError, build_config
from .modalities import MODALITIES, UnknownModalityError, get_modality

__all__ = ["build_parser", "main", "add_run_arguments", "shared_flags", "run_pretraining", "prepare_named_source"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pretrain/dino.py",
        description="Pretrain a ViT encoder for one imaging modality with DINO self-distillation. Without --data "
                    "a small built-in synthetic set of the modality is used (a demo). Rerunning the same command "
                    "with the same --output resumes from the last checkpoint.",
        formatter_class=HelpFormatter)
    parser.add_argument("--modality", required=True,
                        help=f"imaging modality; one of {', '.join(MODALITIES)} (VisionFM spellings such as Fundus, "
                             "OCT, SlitLamp are accepted)")
    parser.add_argument("--data", metavar="DIR|CSV|SOURCES", default=None,
                        help="folder tree of images (png/jpg/tif/bmp, 8/16-bit, grey or colour), a CSV with a "
                             "'path' column, or named training splits under --data-root such as "
                             "DRIVE:train,IDRiD:train,OCT_DME:train; default: built-in synthetic images")
    parser.add_argument("--objective", choices=["dino", "ibot"], default=None,
                        help="dino: self-distillation of the class token; ibot: DINO plus self-distillation of "
                             "masked patch tokens (VisionFM's objective; settings under ibot.* in the config). "
                             "Default: the config's (dino). MAE has its own command, pretrain/mae.py")
    parser.add_argument("--arch", default=None, help="vit_tiny, vit_small, vit_base or vit_large")
    parser.add_argument("--patch-size", type=int, default=None, help="ViT patch size: 16, 14 or 8")
    parser.add_argument("--img-size", type=int, default=None, help="global crop size in pixels")
    parser.add_argument("--local-crops", type=int, default=None, help="number of local crops per image")
    parser.add_argument("--local-size", type=int, default=None, help="local crop size in pixels")
    parser.add_argument("--out-dim", type=int, default=None, help="number of DINO prototypes (head output size)")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs")
    parser.add_argument("--batch-size", type=int, default=None, help="images per process and step")
    parser.add_argument("--lr", type=float, default=None,
                        help="base learning rate for a global batch of 256 (scaled linearly with the batch)")
    add_run_arguments(parser, default_output="runs/dino")
    return parser


def add_run_arguments(parser: argparse.ArgumentParser, default_output: str) -> None:
    """The flags every pretraining command shares after its own: precision, corrupt files, export, and the
    project-wide ones (:func:`visionfm.cli.add_common_arguments`)."""
    parser.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default=None,
                        help="mixed precision: auto = bf16 where supported (CPU and GPU), fp16+scaler on older GPUs")
    parser.add_argument("--skip-corrupt", action="store_true", default=None,
                        help="leave unreadable images out (counted in the log) instead of stopping with an error")
    parser.add_argument("--export-to", metavar="DIR", default=None,
                        help="also export the encoder as DIR/<modality>_<arch>.safetensors (fp16) with an "
                             "index.json entry, e.g. --export-to weights/")
    parser.add_argument("--init-from", metavar="FILE", default=None,
                        help="start from an exported encoder (e.g. weights/cfp_vit_tiny.safetensors) instead of a "
                             "random initialisation: continued pretraining on new data or at a higher resolution "
                             "(the position embedding is resized). Used on a fresh run only; a resumed run continues "
                             "from its checkpoint. The export records the file, its SHA-256 and what it saw")
    parser.add_argument("--export", action="store_true",
                        help="only export the encoder from the checkpoint in --output, without training")
    add_common_arguments(parser, default_output=default_output)


def shared_flags(args: argparse.Namespace, modality: str) -> dict:
    """Config keys set by the flags every pretraining command has (``None``: not given)."""
    return {
        "modality": modality, "data.source": args.data, "data.limit": args.limit,
        "data.skip_corrupt": args.skip_corrupt, "model.arch": args.arch, "model.patch_size": args.patch_size,
        "crops.global_size": args.img_size, "optim.epochs": args.epochs, "optim.batch_size": args.batch_size,
        "optim.lr": args.lr, "train.seed": args.seed, "train.device": args.device, "train.precision": args.precision,
        "train.max_steps": args.max_steps, "export.to": args.export_to, "model.init_from": args.init_from,
    }


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    try:
        modality = get_modality(args.modality)
    except UnknownModalityError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    flags = {**shared_flags(args, modality.name), "objective": args.objective,
             "crops.local_number": args.local_crops, "crops.local_size": args.local_size, "head.out_dim": args.out_dim}
    try:
        cfg = build_config(CONFIG_DIR / "pretrain" / "default.yaml", args.config, flags, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # Imported here so that --help and config errors answer without loading torch.
    from .engine.dino_trainer import check_crop_sizes, check_objective

    try:  # settings that would fail later are refused before anything is written
        check_objective(cfg)
        check_crop_sizes(cfg)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from .engine.dino_trainer import DINOTrainer

    return run_pretraining(cfg, args, modality.name, DINOTrainer)


def run_pretraining(cfg: dict, args: argparse.Namespace, modality: str, trainer_cls: type) -> int:
    """Resolve a named source, then train (or with ``--export`` only export) with ``trainer_cls`` and report the
    summary; returns the exit status (1: bad data or a failed run). Shared by ``pretrain/dino.py`` and
    ``pretrain/mae.py``."""
    from .data.io import ImageReadError
    from .data.unlabeled import DataError
    from .engine.dino_trainer import NonFiniteLossError, export_only

    try:
        prepare_named_source(cfg, args.data_root, args.output, modality)
        if args.export:
            export_only(cfg, args.output, trainer_cls=trainer_cls)
            return 0
        summary = trainer_cls(cfg, args.output).train()
    except (DataError, ImageReadError, NonFiniteLossError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    out = Path(args.output)
    if (out / "encoder.safetensors").is_file():
        print(f"encoder: {out / 'encoder.safetensors'}")
    return 0


def prepare_named_source(cfg: dict, data_root: Optional[str], output: "str | Path", modality: str) -> None:
    """Turn a named source in ``cfg["data"]["source"]`` (training splits under the data root, such as
    ``DRIVE:train,OCT_DME:train``) into an explicit file list, ``<output>/pretrain_images.csv`` (a record of what
    was seen), keeping the spelling in ``data.source_spec`` and describing it in ``export.data_description`` unless
    one is set. A folder, a CSV or no source is left as it is.

    Raises:
        visionfm.data.unlabeled.DataError: an unknown name, or a dataset missing under the data root.
    """
    from .cli import resolve_data_root
    from .data.sources import is_named_source, resolve_named_source, write_source_csv

    source = cfg["data"].get("source")
    if not source or not is_named_source(source):
        return
    earlier = Path(output) / "config.yaml"
    if earlier.is_file():  # the file list of another run in this folder must not be overwritten before the check
        from .config import ConfigMismatchError, load_yaml

        spec = (load_yaml(earlier).get("data") or {}).get("source_spec")
        if spec is not None and spec != source and not cfg["train"].get("resume_with_changes"):
            raise ConfigMismatchError(
                f"{output} holds a run on data.source {spec!r}, not {source!r}; nothing was written. Use a new "
                "--output, or pass --set train.resume_with_changes=true to continue that run on the new data")
    files = resolve_named_source(source, resolve_data_root(data_root), modality)
    cfg["data"]["source_spec"] = source
    cfg["data"]["source"] = str(write_source_csv(files, Path(output) / "pretrain_images.csv"))
    if not cfg["export"].get("data_description"):
        cfg["export"]["data_description"] = f"{len(files)} images: {source} (training splits only)"
