"""``python -m visionfm.weights``: list, verify and convert encoder weights.

Examples:
    python -m visionfm.weights list
    python -m visionfm.weights verify
    python -m visionfm.weights convert VFM_Fundus_weights.pth --modality Fundus
    python -m visionfm.weights export-onnx cfp --output cfp.onnx
    python -m visionfm.weights convert RETFound_cfp_weights.pth --modality cfp --trust-pickle \\
        --output /tmp/retfound_cfp.safetensors
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, TextIO

import torch

from ..errors import UnsafeCheckpointError, UserInputError
from ..modalities import get_modality
from .export import INDEX_NAME, read_index, read_metadata, save_encoder, sha256_file, update_index
from .formats import read_foreign_checkpoint
from .loader import _build_from_state, _weights_dir, load_encoder

__all__ = ["build_parser", "main", "list_weights", "verify_weights", "convert_checkpoint", "export_onnx"]

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _short(text: Any, width: int) -> str:
    text = "" if text is None else str(text)
    return text if len(text) <= width else text[: width - 3] + "..."


def _steps(meta: Dict[str, Any]) -> str:
    if meta.get("steps") is not None:
        return str(meta["steps"])
    if meta.get("epoch") is not None:
        return f"ep{meta['epoch']}"
    return "-"


def list_weights(weights_dir: Path, out: Optional[TextIO] = None) -> int:
    """Print every weights file of ``weights_dir`` with its metadata. Returns the exit status (0)."""
    out = out or sys.stdout
    index = read_index(weights_dir)
    files = sorted(p.name for p in weights_dir.glob("*.safetensors")) if weights_dir.is_dir() else []
    names = sorted(set(index) | set(files))
    if not names:
        print(f"no weights in {weights_dir} (no {INDEX_NAME}, no *.safetensors). Train an encoder with "
              f"'python pretrain/dino.py --modality M ... --export-to {weights_dir}' or convert a published "
              f"checkpoint with 'python -m visionfm.weights convert SRC --modality M'.", file=out)
        return 0
    print(f"weights in {weights_dir} ({len(index)} indexed in {INDEX_NAME})", file=out)
    row = "{:<34} {:<9} {:<16} {:>5} {:>5} {:>8}  {:<44} {}"
    print(row.format("file", "modality", "arch", "patch", "img", "steps", "data", "sha256"), file=out)
    for name in names:
        path = weights_dir / name
        if name in index:
            meta = index[name]
            sha = str(meta.get("sha256", ""))[:12] or "-"
            if not path.is_file():
                sha += " (MISSING FILE)"
        else:
            meta = read_metadata(path)
            sha = "(not in index.json)"
        # CLIP heads name the modality of their image side and describe themselves by format.
        modality = meta.get("modality") or meta.get("image_modality", "?")
        arch = meta.get("arch") or ("clip head" if str(meta.get("format", "")).startswith("visionfm-clip") else "?")
        print(row.format(_short(name, 34), _short(modality, 9), _short(arch, 16),
                         str(meta.get("patch_size", "?")), str(meta.get("img_size", "?")), _steps(meta),
                         _short(meta.get("data", "-"), 44), sha), file=out)
    return 0


def verify_weights(weights_dir: Path, out: Optional[TextIO] = None) -> int:
    """Recompute each indexed file's sha256 and compare it (and the header's modality/arch) with
    ``index.json``. Returns 0 when everything matches, 1 otherwise (missing files, mismatches, files that are
    not indexed, nothing to verify)."""
    out = out or sys.stdout
    index = read_index(weights_dir)
    files = sorted(p.name for p in weights_dir.glob("*.safetensors")) if weights_dir.is_dir() else []
    if not index and not files:
        print(f"FAIL nothing to verify: no {INDEX_NAME} and no *.safetensors in {weights_dir}", file=out)
        return 1
    problems = 0
    for name in sorted(index):
        entry, path = index[name], weights_dir / name
        if not path.is_file():
            print(f"FAIL {name}: listed in {INDEX_NAME} but the file is missing", file=out)
            problems += 1
            continue
        sha = sha256_file(path)
        if sha != entry.get("sha256"):
            print(f"FAIL {name}: sha256 {sha[:12]} does not match {INDEX_NAME} ({str(entry.get('sha256'))[:12]}): "
                  f"the file changed or is corrupt", file=out)
            problems += 1
            continue
        header = read_metadata(path)
        differing = [k for k in ("modality", "arch") if header.get(k) != entry.get(k)]
        if differing:
            print(f"FAIL {name}: header and {INDEX_NAME} disagree on {', '.join(differing)}", file=out)
            problems += 1
            continue
        print(f"ok   {name}: sha256 {sha[:12]} ({entry.get('modality')}, {entry.get('arch')})", file=out)
    for name in files:
        if name not in index:
            print(f"FAIL {name}: not in {INDEX_NAME} (add it with 'python -m visionfm.weights convert')", file=out)
            problems += 1
    print(f"{'FAIL' if problems else 'ok'}: {len(index)} indexed, {problems} problem(s) in {weights_dir}", file=out)
    return 1 if problems else 0


def convert_checkpoint(source: Path, modality: str, output: Optional[Path] = None,
                       weights_dir: Optional[Path] = None, allow_pickle: bool = False,
                       checkpoint_key: Optional[str] = None, num_heads: Optional[int] = None,
                       mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                       dtype: str = "float32", force: bool = False, out: Optional[TextIO] = None) -> Path:
    """Convert a foreign checkpoint to our safetensors format and add it to its folder's ``index.json``.

    The mapped weights are loaded strictly into the encoder before anything is written, and the written file
    is loaded back the way every downstream script loads it.

    Returns:
        The written file.

    Raises:
        FileExistsError: the output exists and ``force`` is off.
        ValueError: the checkpoint's own modality differs from ``modality``, or it does not map exactly.
    """
    out = out or sys.stdout
    requested = get_modality(modality)
    foreign = read_foreign_checkpoint(source, requested.name, allow_pickle=allow_pickle,
                                      checkpoint_key=checkpoint_key, num_heads=num_heads, mean=mean, std=std)
    meta = foreign.metadata
    if meta["modality"] != requested.name:
        raise UserInputError(f"{source}: the checkpoint was trained on {meta['modality']} images, but --modality "
                         f"{modality} ({requested.name}) was given; pass --modality {meta['modality']}")
    encoder, _ = _build_from_state(foreign.state, meta, requested.name, Path(source), None, None, 0.0,
                                   foreign.report, num_heads)
    target = Path(output) if output else _weights_dir(weights_dir) / f"{requested.name}_{meta['arch']}.safetensors"
    if target.suffix != ".safetensors":
        raise UserInputError(f"--output {target}: the file name must end in .safetensors")
    if target.exists() and not force:
        raise FileExistsError(f"{target} exists; pass --force to replace it")
    meta = {**meta, "dtype": dtype}
    sha = save_encoder(encoder.state_dict(), target, meta, dtype=_DTYPES[dtype])
    index = update_index(target.parent, target.name, meta, sha)
    load_encoder(requested.name, weights=target)  # the written file loads exactly, as downstream loads it
    report = foreign.report
    dropped = ", ".join(f"{why}: {len(keys)}" for why, keys in sorted(report.dropped.items())) or "none"
    print(f"converted {source} ({report.source_format} layout) -> {target}", file=out)
    print(f"  modality {meta['modality']}, arch {meta['arch']}, patch {meta['patch_size']}, img {meta['img_size']}, "
          f"{meta['num_heads']} heads, dtype {dtype}", file=out)
    print(f"  normalisation mean {meta['mean']} std {meta['std']} ({meta['normalisation_source']})", file=out)
    print(f"  keys: {report.mapped} mapped, missing none, unexpected none; dropped (known): {dropped}", file=out)
    print(f"  sha256 {sha}; index {index}", file=out)
    return target


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m visionfm.weights",
                                     description="List, verify, convert and export (ONNX) VisionFM encoder weights.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every step (key reports included)")
    commands = parser.add_subparsers(dest="command", required=True)
    dir_help = "weights folder (default: $VISIONFM_WEIGHTS or the checkout's weights/)"

    listing = commands.add_parser("list", help="list the weights files with their metadata")
    listing.add_argument("--weights-dir", type=Path, default=None, help=dir_help)

    verify = commands.add_parser("verify", help="recompute sha256 of each file against index.json")
    verify.add_argument("--weights-dir", type=Path, default=None, help=dir_help)

    convert = commands.add_parser("convert", help="convert a foreign checkpoint to safetensors + metadata")
    convert.add_argument("source", type=Path, metavar="SRC",
                         help="checkpoint: VFM_<Modality>_weights.pth, DINO/iBOT/DINOv2/RETFound .pth, timm "
                              "state dict or .safetensors")
    convert.add_argument("--modality", required=True, help="modality name or alias (cfp/Fundus, oct/OCT, ...)")
    convert.add_argument("--output", type=Path, default=None, metavar="PATH",
                         help="output .safetensors (default: <weights-dir>/<modality>_<arch>.safetensors)")
    convert.add_argument("--weights-dir", type=Path, default=None, help=dir_help)
    convert.add_argument("--checkpoint-key", default=None, metavar="KEY",
                         help="entry holding the encoder (default: teacher, student, model, state_dict)")
    convert.add_argument("--num-heads", type=int, default=None, metavar="N",
                         help="attention heads, for widths other than 192/384/768/1024/1280/1536")
    convert.add_argument("--mean", type=float, nargs=3, default=None, help="override the normalisation mean")
    convert.add_argument("--std", type=float, nargs=3, default=None, help="override the normalisation std")
    convert.add_argument("--dtype", choices=sorted(_DTYPES), default="float32", help="stored tensor type")
    convert.add_argument("--force", action="store_true", help="replace an existing output file")
    convert.add_argument("--trust-pickle", action="store_true",
                         help="fully unpickle a .pth the safe loader refuses. A pickle can run arbitrary code "
                              "when loaded: only for files from a source you trust")

    onnx = commands.add_parser("export-onnx", help="export an encoder to ONNX (dynamic batch axis), checked against "
                                                   "PyTorch with onnxruntime")
    onnx.add_argument("modality", help="modality whose encoder is exported (cfp, oct, ...)")
    onnx.add_argument("--weights", type=Path, default=None, metavar="PATH",
                      help="encoder weights (default: weights/<modality>_<arch>.safetensors)")
    onnx.add_argument("--weights-dir", type=Path, default=None, help=dir_help)
    onnx.add_argument("--output", type=Path, required=True, metavar="FILE", help="the .onnx file to write")
    onnx.add_argument("--img-size", type=int, default=224,
                      help="input height and width of the exported graph (fixed; the batch axis is dynamic)")
    onnx.add_argument("--opset", type=int, default=17, help="ONNX opset")
    onnx.add_argument("--check-images", default=None, metavar="DIR|CSV",
                      help="compare ONNX and PyTorch on up to 4 of these images (default: 3 random inputs)")
    onnx.add_argument("--tolerance", type=float, default=1e-3,
                      help="largest absolute difference between onnxruntime and PyTorch features accepted")
    return parser


def export_onnx(args: argparse.Namespace, out: Optional[TextIO] = None) -> int:
    """``export-onnx``: write the encoder as ONNX, run it with onnxruntime against PyTorch, print the largest
    absolute difference; exit status 1 when it exceeds ``--tolerance`` (the file is then removed)."""
    from ..errors import VisionFMError  # noqa: PLC0415
    from .onnx import check_images, check_onnx, export_encoder_onnx  # noqa: PLC0415

    out = out or sys.stdout
    modality = get_modality(args.modality).name
    encoder, info = load_encoder(modality, weights=args.weights, img_size=args.img_size,
                                 weights_dir=args.weights_dir)
    encoder.eval()
    meta = {"modality": modality, "arch": info.arch, "source": info.source, "img_size": info.img_size,
            "mean": list(info.mean), "std": list(info.std), "output": "pooled class token (encoder(images))"}
    path = export_encoder_onnx(encoder, args.output, info.img_size, args.opset, meta)
    inputs, what = check_images(args.check_images, modality, info.img_size, info.patch_size, info.mean, info.std)
    diff, shape = check_onnx(path, encoder, inputs)
    print(f"exported {modality} {info.arch} encoder ({info.source}) -> {path}", file=out)
    print(f"  input 'images' (batch, 3, {info.img_size}, {info.img_size}) normalised with mean {list(info.mean)} std "
          f"{list(info.std)}; output 'features' (batch, {info.embed_dim}); batch axis dynamic", file=out)
    print(f"  onnxruntime vs PyTorch on {what}: output {shape}, largest absolute difference {diff:.3g}", file=out)
    if not diff <= args.tolerance:
        path.unlink()
        raise VisionFMError(f"{path}: onnxruntime and PyTorch differ by {diff:.3g} > --tolerance {args.tolerance}; "
                            f"the file was removed")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        if args.command == "list":
            return list_weights(_weights_dir(args.weights_dir))
        if args.command == "verify":
            return verify_weights(_weights_dir(args.weights_dir))
        if args.command == "export-onnx":
            return export_onnx(args)
        convert_checkpoint(args.source, args.modality, output=args.output, weights_dir=args.weights_dir,
                           allow_pickle=args.trust_pickle, checkpoint_key=args.checkpoint_key,
                           num_heads=args.num_heads, mean=args.mean, std=args.std, dtype=args.dtype,
                           force=args.force)
        return 0
    except UnsafeCheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
