"""``python downstream/embed.py``: pooled encoder features of a folder (or CSV) of images."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import List, Optional

from ..cli import HelpFormatter, output_folder, positive_int, resolve_device
from ..modalities import MODALITIES

__all__ = ["build_parser", "add_encoder_arguments", "add_input_arguments", "main"]


def add_encoder_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--modality`` and ``--weights``: which encoder a command applies to new images."""
    parser.add_argument("--modality", default="cfp", help=f"imaging modality, one of {', '.join(MODALITIES)}")
    parser.add_argument("--weights", default=None, metavar="PATH",
                        help="encoder weights (default: weights/<modality>_<arch>.safetensors)")
    return parser


def add_input_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--images``, ``--limit``, ``--recursive``, ``--skip-corrupt`` and ``--device``: how every command that
    applies a model to new images takes them."""
    parser.add_argument("--images", required=True, metavar="DIR|CSV",
                        help="folder of images (png, jpg, tif incl. 16-bit and grey, bmp, gif) or a CSV with a path "
                             "column (relative to the CSV's folder) and an optional label column")
    parser.add_argument("--recursive", action="store_true", help="include the folder's subfolders")
    parser.add_argument("--skip-corrupt", action="store_true",
                        help="leave out unreadable files (counted in the log) instead of stopping at the first")
    parser.add_argument("--limit", type=positive_int, default=None, metavar="N", help="at most N images")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="downstream/embed.py",
        description="Pooled features of every image with a modality's encoder: <output>/embeddings.npy (N x D, "
                    "float32) + index.csv (row, path, name, label), or one embeddings.safetensors (--format), and "
                    "embeddings_pca.png, a 2-D PCA scatter coloured by the CSV's label column when it has one. "
                    "Images are read as the encoder's training images were (channels, squaring, size, "
                    "normalisation); large ones are decoded at a reduced scale where possible and resized.",
        formatter_class=HelpFormatter)
    add_encoder_arguments(parser)
    parser.add_argument("--pool", choices=["cls", "mean", "cls+mean"], default="cls",
                        help="class token, mean of the patch tokens, or both concatenated")
    parser.add_argument("--img-size", type=positive_int, default=None,
                        help="encoder input size (default: the size the weights were trained at)")
    parser.add_argument("--format", choices=["npy", "safetensors"], default="npy", help="file format")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="images per forward pass")
    parser.add_argument("--output", default="runs/embed", metavar="DIR", type=output_folder, help="output folder")
    add_input_arguments(parser)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stdout)
    # Imported here so that --help answers without loading torch.
    from ..modalities import get_modality  # noqa: PLC0415
    from ..weights.loader import load_encoder  # noqa: PLC0415
    from .embed import compute_embeddings, pca, plot_embedding_scatter, save_embeddings  # noqa: PLC0415
    from ..data.encoder_inputs import prepare_inputs  # noqa: PLC0415
    from .outputs import StagedOutput  # noqa: PLC0415

    modality = get_modality(args.modality).name
    encoder, info = load_encoder(modality, weights=args.weights, img_size=args.img_size)
    images = prepare_inputs(args.images, modality, info.patch_size, limit=args.limit, recursive=args.recursive,
                            skip_corrupt=args.skip_corrupt,
                            large=f"decoded at a reduced scale where the format allows, squared and resized to "
                                  f"{info.img_size} px")
    device = resolve_device(args.device)
    features = compute_embeddings(encoder, images, modality, info.img_size, info.mean, info.std, args.pool,
                                  args.batch_size, device)
    meta = {"modality": modality, "weights": info.source, "arch": info.arch, "img_size": info.img_size,
            "pool": args.pool, "mean": list(info.mean), "std": list(info.std)}
    output = Path(args.output)
    with StagedOutput(output) as out:
        if args.format == "npy":
            save_embeddings(features, images, out.path("embeddings.npy"), out.path("index.csv"), meta)
        else:
            save_embeddings(features, images, out.path("embeddings.safetensors"), None, meta)
        if len(images) >= 2:
            coords = pca(features, 2)
            plot_embedding_scatter(coords, out.path("embeddings_pca.png"), [im.label for im in images],
                                   [im.name for im in images],
                                   f"{modality} {info.arch} {args.pool} features, {len(images)} images (PCA)")
        else:
            logging.getLogger(__name__).info("one image: no PCA scatter")
        out.path("embed.json").write_text(json.dumps({**meta, "images": len(images), "dim": int(features.shape[1])},
                                                     indent=2))
    print(json.dumps({"images": len(images), "dim": int(features.shape[1]), "output": str(output)}))
    return 0
