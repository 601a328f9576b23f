"""``python downstream/attention.py``: attention and PCA overlays of a folder of images."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import List, Optional

from ..cli import HelpFormatter, output_folder, positive_int, resolve_device
from .embed_cli import add_encoder_arguments, add_input_arguments

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="downstream/attention.py",
        description="Where the encoder looks, as in the DINO paper's figures: for each image, the last block's "
                    "class-token attention of every head (<name>_head<k>.png, and their mean <name>_attn_mean.png) "
                    "and the first three PCA components of the patch features as colours (<name>_pca.png), drawn "
                    "over the image at its own resolution, plus <name>_panel.png with all of them side by side.",
        formatter_class=HelpFormatter)
    add_encoder_arguments(parser)
    parser.add_argument("--size", type=positive_int, default=None,
                        help="longer side of the image as the encoder sees it (aspect kept; more pixels give a finer "
                             "map). Default: twice the size the weights were trained at")
    parser.add_argument("--output", default="runs/attention", metavar="DIR", type=output_folder,
                        help="output folder")
    add_input_arguments(parser)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stdout)
    from ..modalities import get_modality  # noqa: PLC0415
    from ..weights.loader import load_encoder  # noqa: PLC0415
    from .attention import write_attention_pngs  # noqa: PLC0415
    from ..data.encoder_inputs import iter_batches, prepare_inputs  # noqa: PLC0415
    from .outputs import StagedOutput  # noqa: PLC0415

    log = logging.getLogger("visionfm.attention")
    m = get_modality(args.modality)
    encoder, info = load_encoder(m.name, weights=args.weights)
    size = args.size or 2 * info.img_size
    images = prepare_inputs(args.images, m.name, info.patch_size, limit=args.limit, recursive=args.recursive,
                            skip_corrupt=args.skip_corrupt,
                            large=f"run through the encoder with its longer side at {size} px; overlays written at "
                                  f"a downscaled resolution")
    device = resolve_device(args.device)
    log.info("encoder input: longer side %d px (aspect kept), %d heads in the last block", size,
             encoder.blocks[-1].attn.num_heads)
    output = Path(args.output)
    count = 0
    with StagedOutput(output) as out:
        folder = out.folder
        for chunk in iter_batches(images, 1, "attention"):
            written = write_attention_pngs(encoder, chunk[0], folder, size, info.mean, info.std, m.channels, device)
            count += sum(len(v) for v in written.values())
    print(json.dumps({"images": len(images), "pngs": count, "output": str(output)}))
    return 0
