#!/usr/bin/env python
"""MAE pretraining step time by input size and precision, side by side in one process.

Times what one step of ``pretrain/mae.py`` costs without data loading: the library's :class:`MAEModel` (timm ViT
encoder on the visible patches through lightly, the MAE decoder), its masking, :class:`MAELoss` and AdamW, on random
input, under bf16 autocast and in fp32, at each ``--sizes``. Use it to choose a pretraining resolution for a time
budget (for example a 224-px stage after a 112-px one: ``configs/pretrain/cfp_vit_tiny_224.yaml``) and to see what
bf16 buys on a given CPU (large on AMX, little on avx512_bf16 alone, a loss on AVX2-only CPUs).

Example:
    python benchmarks/mae_step.py --sizes 112 160 224 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import List, Optional

import torch

from visionfm.models.vit import create_encoder, set_fused_attention
from visionfm.objectives.mae import MAELoss, MAEModel

from pretrain_step import machine  # the sibling benchmark's CPU / torch description (benchmarks/ is on sys.path)


def step_seconds(size: int, dtype: Optional[torch.dtype], args: argparse.Namespace) -> float:
    """Median wall time of ``args.repeats`` MAE steps at ``size`` px after two warm-up steps."""
    torch.manual_seed(0)
    model = MAEModel(create_encoder(args.arch, args.patch_size, size), decoder_dim=args.decoder_dim,
                     decoder_depth=args.decoder_depth, decoder_num_heads=args.decoder_heads)
    set_fused_attention(model, False)  # what model.attention: auto picks on the CPU
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = MAELoss(norm_pix_loss=True)
    images = torch.randn(args.batch_size, 3, size, size)
    times: List[float] = []
    for _ in range(args.repeats + 2):
        start = time.perf_counter()
        idx_keep, idx_mask = model.random_mask(args.batch_size, args.mask_ratio)
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            predictions = model(images, idx_keep, idx_mask)
        loss = loss_fn(predictions.float(), model.patch_targets(images, idx_mask))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[112, 160, 224], help="input sizes in pixels")
    parser.add_argument("--arch", default="vit_tiny")
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--mask-ratio", type=float, default=0.75)
    parser.add_argument("--decoder-dim", type=int, default=256, help="the shipped recipes' decoder: 256 x 4, 8 heads")
    parser.add_argument("--decoder-depth", type=int, default=4)
    parser.add_argument("--decoder-heads", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=4, help="timed steps per case (median reported)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    host = machine()
    print(f"{host['cpu']}, {host['threads']} threads, torch {host['torch']}, {args.arch}/"
          f"{args.patch_size}, batch {args.batch_size}, decoder {args.decoder_dim} x {args.decoder_depth}")
    print("| size | bf16 s/step | fp32 s/step | fp32 / bf16 | bf16 step / smallest size's |")
    print("|---|---|---|---|---|")
    first = None
    for size in args.sizes:
        bf16 = step_seconds(size, torch.bfloat16, args)
        fp32 = step_seconds(size, None, args)
        first = first or bf16
        print(f"| {size} | {bf16:.3f} | {fp32:.3f} | {fp32 / bf16:.2f}x | {bf16 / first:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
