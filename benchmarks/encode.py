#!/usr/bin/env python
"""Feature-extraction throughput: an exported VisionFM encoder, run the library's way, against a plain timm forward.

*ours*: an encoder exported with :func:`visionfm.weights.export.save_encoder` (the format ``pretrain/dino.py``
writes), loaded with :func:`visionfm.weights.loader.load_encoder`, features from
:func:`visionfm.models.vit.cls_features` (the last block computes the CLS token only) with the attention that is
fast on the device (:func:`visionfm.models.vit.set_fused_attention`: explicit on the CPU, fused on GPUs).

*timm*: ``timm.create_model("<arch>_patch16_224", num_classes=0)`` with the same weights, ``model(images)``.

Both in eval mode under ``torch.inference_mode()``, in fp32 and under bf16 autocast, alternating, after warm-up;
reports median images/s, the ratio and the largest feature difference (they compute the same features).

Example:
    python benchmarks/encode.py --arch vit_tiny vit_small --batch-size 32 --json encode.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import timm
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from visionfm.engine.threads import fastest_cpu_threads  # noqa: E402
from visionfm.models.vit import cls_features, create_encoder, set_fused_attention  # noqa: E402
from visionfm.modalities import get_modality  # noqa: E402
from visionfm.weights.export import save_encoder  # noqa: E402
from visionfm.weights.loader import load_encoder  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def export_random(arch: str, modality: str, img_size: int, folder: Path) -> Path:
    """A randomly initialised encoder written in the exported format (weights do not change the speed)."""
    encoder = create_encoder(arch, 16, img_size)
    m = get_modality(modality)
    meta = {"format": "visionfm-encoder/1", "modality": m.name, "arch": arch, "patch_size": 16, "img_size": img_size,
            "embed_dim": encoder.embed_dim, "mean": list(m.mean), "std": list(m.std), "steps": 0,
            "objective": "dino", "data": "random initialisation (benchmark)",
            "timm_class": "timm.models.vision_transformer.VisionTransformer"}
    path = folder / f"{m.name}_{arch}.safetensors"
    save_encoder(encoder.state_dict(), path, meta)
    return path


def run_case(args: argparse.Namespace, arch: str, device: torch.device, folder: Path) -> List[Dict[str, Any]]:
    path = export_random(arch, args.modality, args.img_size, folder)
    ours, _ = load_encoder(args.modality, weights=path)
    ours.eval().to(device)
    set_fused_attention(ours, device.type != "cpu")
    plain = timm.create_model(f"{arch}_patch16_{args.img_size}", num_classes=0, pretrained=False)
    plain.load_state_dict(ours.state_dict(), strict=True)
    plain.eval().to(device)
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    rows = []
    for precision in args.precision:
        dtype = torch.bfloat16 if precision == "bf16" else None
        amp = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext
        fns = {"ours": lambda: cls_features(ours, images), "timm": lambda: plain(images)}
        with torch.inference_mode():
            with amp():
                diff = (fns["ours"]().float() - fns["timm"]().float()).abs().max().item()
            times: Dict[str, List[float]] = {"ours": [], "timm": []}
            for r in range(args.repeats + 1):
                for name in (("ours", "timm") if r % 2 == 0 else ("timm", "ours")):
                    sync(device)
                    t0 = time.perf_counter()
                    with amp():
                        fns[name]()
                    sync(device)
                    if r:  # the first round warms up
                        times[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append({"arch": arch, "precision": precision, "batch_size": args.batch_size, "img_size": args.img_size,
                     "device": str(device), "threads": torch.get_num_threads(),
                     "ours_images_per_s": args.batch_size / med["ours"],
                     "timm_images_per_s": args.batch_size / med["timm"], "ratio": med["timm"] / med["ours"],
                     "max_abs_diff": diff, "ours_s": times["ours"], "timm_s": times["timm"]})
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", nargs="+", default=["vit_tiny", "vit_small"])
    p.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--modality", default="cfp")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default=None)
    p.add_argument("--threads", default="auto", help="a number, 'default' (torch's) or 'auto' (see pretrain_step.py)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu" and args.threads != "default":
        torch.set_num_threads(fastest_cpu_threads() if args.threads == "auto" else int(args.threads))
    rows: List[Dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.arch:
            rows += run_case(args, arch, device, Path(tmp))
    print(f"{'arch':<10} {'precision':<9} {'batch':>5} {'ours img/s':>10} {'timm img/s':>10} {'ratio':>6} {'max |diff|':>10}")
    for r in rows:
        print(f"{r['arch']:<10} {r['precision']:<9} {r['batch_size']:>5} {r['ours_images_per_s']:>10.1f} "
              f"{r['timm_images_per_s']:>10.1f} {r['ratio']:>5.2f}x {r['max_abs_diff']:>10.2e}")
    print(f"device {device}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))
    # bf16 features may differ by bf16 rounding; fp32 ones only by summation order
    bad = [r for r in rows if r["max_abs_diff"] > (0.25 if r["precision"] == "bf16" else 1e-3)]
    for r in bad:
        print(f"error: {r['arch']} {r['precision']}: features differ by {r['max_abs_diff']:.3g}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
