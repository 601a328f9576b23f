#!/usr/bin/env python
"""Where a segmentation training step spends its time, for head variants side by side.

Builds the mmseg model of a segmentation config (``configs/seg/*.yaml``: our ViT backbone, pyramid neck and
decode head, exactly as ``downstream/seg.py`` does), and times on random crops of the config's size and batch:

- ``step``: the whole training step (preprocessing, forward, loss, backward, AdamW);
- ``encoder``: the ViT's forward + backward alone (forward only for a frozen encoder);
- ``neck+head``: the pyramid neck and decode head forward + backward on fixed encoder features.

Each ``--compare "KEY=VALUE [KEY=VALUE ...]"`` adds a variant of the base config (``--set`` syntax); all
variants are timed alternately in one process after a warm-up step each, and the table gives median seconds
and each variant's step time relative to the first. Random weights and inputs: the time of a step does not depend on
them. The encoder weights file is not needed (``model.random_init`` is forced).

Example (what the stride-4 stage of ``drive_target.yaml`` costs over the two-stage image path):
    python benchmarks/seg_step.py --config configs/seg/drive_target.yaml \\
        --compare model.stem_channels=[16,32] --compare model.norm=BN --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from visionfm.config import apply_overrides, build_config  # noqa: E402
from visionfm.engine.threads import fastest_cpu_threads  # noqa: E402
from visionfm.tasks.segmentation.cli import DEFAULT_CONFIG  # noqa: E402
from visionfm.tasks.segmentation.model import build_segmentor  # noqa: E402
from visionfm.tasks.segmentation.runner import _batch  # noqa: E402


def _parse(argv: List[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="experiment YAML merged over configs/seg/default.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override for the base config (repeatable)")
    p.add_argument("--compare", action="append", default=[], metavar="SETTINGS",
                   help="a variant of the base config to time beside it: KEY=VALUE settings separated by spaces, "
                        "in one quoted argument (repeatable)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per variant (median reported)")
    p.add_argument("--threads", default="auto",
                   help="CPU threads: auto (the faster of 1 and all cores now) or a number")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    return p.parse_args(argv)


class _Variant:
    """One model with its optimiser and a fixed random batch, and closures timing its parts."""

    def __init__(self, name: str, cfg: Dict[str, Any], device: torch.device) -> None:
        self.name, self.cfg = name, cfg
        torch.manual_seed(0)
        self.model, _ = build_segmentor(cfg)
        self.model.to(device).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        batch, crop = int(cfg["optim"]["batch_size"]), int(cfg["data"]["crop_size"])
        images = torch.rand(batch, 3, crop, crop, device=device) * 255
        labels = (torch.rand(batch, crop, crop, device=device) > 0.88).long()  # ~ DRIVE's vessel share
        self.batch = _batch(images, labels)
        self.inputs = self.model.data_preprocessor(self.batch, training=True)["inputs"]
        with torch.no_grad():
            self.features = [f.detach() for f in self.model.backbone(self.inputs)]
        self.params = sum(p.numel() for p in self.model.parameters()) / 1e6

    def step(self) -> None:
        batch = self.model.data_preprocessor(self.batch, training=True)
        loss, _ = self.model.parse_losses(self.model(**batch, mode="loss"))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def encoder(self) -> None:
        if not any(p.requires_grad for p in self.model.backbone.parameters()):  # frozen: forward only
            with torch.no_grad():
                self.model.backbone(self.inputs)
            return
        out = self.model.backbone(self.inputs)
        sum(o.float().mean() for o in out).backward()

    def neck_head(self) -> None:
        out = self.model.decode_head(self.model.neck(self.features))
        out.float().mean().backward()


def _timed(fn: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main(argv: "List[str] | None" = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    device = torch.device(args.device)
    base = build_config(DEFAULT_CONFIG, args.config, None, [*args.overrides, "model.random_init=true"])
    variants = [_Variant("base", base, device)]
    for spec in args.compare:
        cfg = apply_overrides(build_config(DEFAULT_CONFIG, args.config, None, args.overrides),
                              ["model.random_init=true", *spec.split()])
        variants.append(_Variant(spec, cfg, device))
    threads_before = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(fastest_cpu_threads() if args.threads == "auto" else int(args.threads))
    try:
        _report(args, device, base, variants)
    finally:
        torch.set_num_threads(threads_before)  # main() is also called in-process (tests)
    return 0


def _report(args: argparse.Namespace, device: torch.device, base: Dict[str, Any], variants: List[_Variant]) -> None:
    parts = ("step", "encoder", "neck_head")
    times: Dict[str, Dict[str, List[float]]] = {v.name: {p: [] for p in parts} for v in variants}
    for v in variants:  # warm-up: allocator, oneDNN kernels
        for part in parts:
            getattr(v, part)()
    for _ in range(max(1, args.repeats)):
        for v in variants:
            for part in parts:
                times[v.name][part].append(_timed(getattr(v, part), device))
    crop, batch = base["data"]["crop_size"], base["optim"]["batch_size"]
    print(f"segmentation training step, batch {batch} x {crop} px, {device}"
          + (f", {torch.get_num_threads()} threads" if device.type == "cpu" else "")
          + f", median of {args.repeats} (seconds)")
    width = max(len(v.name) for v in variants)
    print(f"{'variant':<{width}}  {'params M':>8}  {'step':>7}  {'encoder':>7}  {'neck+head':>9}  {'vs base':>7}")
    first = statistics.median(times[variants[0].name]["step"])
    for v in variants:
        med = {p: statistics.median(times[v.name][p]) for p in parts}
        print(f"{v.name:<{width}}  {v.params:>8.2f}  {med['step']:>7.3f}  {med['encoder']:>7.3f}  "
              f"{med['neck_head']:>9.3f}  {med['step'] / first:>6.2f}x")


if __name__ == "__main__":
    raise SystemExit(main())
