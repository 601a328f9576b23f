"""``python pretrain/mae.py``: masked-autoencoder (MAE) pretraining of one modality's encoder (the CLI's logic
lives here; the conventions are ``pretrain/dino.py``'s)."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional

from .pretrain_cli import add_run_arguments, run_pretraining, shared_flags
from .config import CONFIG_DIR, ConfigError, build_config
from .modalities import MODALITIES, UnknownModalityError, get_modality

__all__ = ["build_mae_parser", "mae_main"]

#: The default config (merged under ``--config``, the flags and ``--set``).
DEFAULT_CONFIG = CONFIG_DIR / "pretrain" / "mae.yaml"


def build_mae_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pretrain/mae.py",
        description="Pretrain a ViT encoder for one imaging modality as a masked autoencoder (MAE, the objective "
                    "RETFound uses): the encoder sees a random share of each image's patches and a light decoder "
                    "reconstructs the pixels of the others. Only the encoder is exported; it loads like a DINO "
                    "encoder. Without --data a small built-in synthetic set of the modality is used (a demo). "
                    "Rerunning the same command with the same --output resumes from the last checkpoint. Defaults "
                    "come from configs/pretrain/mae.yaml (the '(config: ...)' values below).")
    parser.add_argument("--modality", required=True,
                        help=f"imaging modality; one of {', '.join(MODALITIES)} (VisionFM spellings such as Fundus, "
                             "OCT, SlitLamp are accepted)")
    parser.add_argument("--data", metavar="DIR|CSV|SOURCES", default=None,
                        help="folder tree of images (png/jpg/tif/bmp, 8/16-bit, grey or colour), a CSV with a "
                             "'path' column, or named training splits under --data-root such as "
                             "DRIVE:train,IDRiD:train,OCT_DME:train; default: built-in synthetic images")
    parser.add_argument("--arch", default=None, help="vit_tiny, vit_small, vit_base or vit_large (config: vit_tiny)")
    parser.add_argument("--patch-size", type=int, default=None, help="ViT patch size: 16, 14 or 8 (config: 16)")
    parser.add_argument("--img-size", type=int, default=None,
                        help="input size in pixels: one random resized crop per image, a multiple of the patch size "
                             "(config: 224)")
    parser.add_argument("--mask-ratio", type=float, default=None,
                        help="share of each image's patches hidden from the encoder and reconstructed by the decoder, "
                             "strictly between 0 and 1 (config: 0.75, MAE's)")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (config: 800)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per process and step (config: 64)")
    parser.add_argument("--lr", type=float, default=None,
                        help="base learning rate for a global batch of 256, scaled linearly with the batch "
                             "(config: 1.5e-4, MAE's)")
    add_run_arguments(parser, default_output="runs/mae")
    return parser


def mae_main(argv: Optional[List[str]] = None) -> int:
    """Run ``pretrain/mae.py``; returns the exit status (2: bad options, 1: bad data or a failed run)."""
    args = build_mae_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    try:
        modality = get_modality(args.modality)
    except UnknownModalityError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    flags = {**shared_flags(args, modality.name), "mae.mask_ratio": args.mask_ratio}
    try:
        cfg = build_config(DEFAULT_CONFIG, args.config, flags, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # Imported here so that --help and config errors answer without loading torch.
    from .engine.mae_trainer import check_mae_config

    try:  # settings that would fail later are refused before anything is built or written
        check_mae_config(cfg)
    except (ValueError, TypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from .engine.mae_trainer import MAETrainer

    return run_pretraining(cfg, args, modality.name, MAETrainer)
